"""The Python side of the bash recipes (pretrain_7b.sh, finetune_7b.sh), for
``torchrun [options] examples/pretrain_7b.sh [flags]``.

torchrun runs its script with the Python interpreter, so each recipe is a file that bash and
Python both read: bash runs its first part (hidden from Python in a string) and exits; Python
runs the last lines, which call `run_recipe`. The recipe's flags exist only in the bash part:
`recipe_args` runs it with ``RECIPE_PRINT_ARGS=1``, under which it prints its argument list
(NUL-separated) instead of starting torchrun, and `run_recipe` trains with them in this
process, followed by the flags given after the script (argparse: the last one wins).
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def recipe_args(recipe: str) -> list[str]:
    """The flags that ``bash RECIPE`` would pass to examples/pretrain.py, for the layout of
    this torchrun (``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``, which the recipe reads)."""
    env = {**os.environ, "RECIPE_PRINT_ARGS": "1"}
    result = subprocess.run(["bash", recipe], env=env, stdout=subprocess.PIPE, check=False)
    if result.returncode != 0:  # the recipe said why on stderr
        raise SystemExit(f"{recipe}: its bash part failed (exit {result.returncode})")
    return result.stdout.decode().split("\0")[:-1]


def run_recipe(recipe: str, argv: list[str] | None = None) -> int:
    """Train with RECIPE's flags, then ``argv`` (default ``sys.argv[1:]``), in this process."""
    sys.path.insert(0, HERE)
    from pretrain import main  # examples/pretrain.py, beside this file

    return main(recipe_args(recipe) + (sys.argv[1:] if argv is None else argv))
