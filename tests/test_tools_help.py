"""Every command-line program's ``--help`` exits 0 and prints its usage, with no other flag:
the tools, the benchmarks and the Python examples, found by listing their folders (so a new
one is covered without editing this file).

Run as a user runs them (``python tools/plan.py --help`` from the repository), all at once:
each mostly waits for ``import torch``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.paths import REPO


def programs() -> list[str]:
    found = []
    for folder in ("tools", "benchmarks", "examples"):
        for path in sorted((REPO / folder).glob("*.py")):
            if "__main__" in path.read_text():  # a program, not a module the others import
                found.append(f"{folder}/{path.name}")
    return found


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {
        name: subprocess.Popen(
            [sys.executable, name, "--help"],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for name in programs()
    }
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                    stderr)  # fmt: skip
    return results


def test_the_programs_are_found():
    names = programs()
    assert {"tools/plan.py", "tools/preprocess_data.py", "examples/pretrain.py"} <= set(names)
    assert "benchmarks/dedup.py" in names and "examples/recipe.py" not in names


@pytest.mark.parametrize("name", programs())
def test_help_exits_0_with_the_usage(helps, name):
    result = helps[name]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout.lower(), result.stdout[:500]
