"""Print what a training job costs per rank, without allocating anything.

Takes the trainer's flags (or ``--config``) plus ``--world-size``::

    python tools/plan.py --world-size 32 --model-preset llama2-7b \
        --tensor-model-parallel-size 8 --bf16 --use-distributed-optimizer \
        --micro-batch-size 1 --global-batch-size 256 --seq-length 4096 \
        --device-memory-gb 80

With ``--lora-rank 16`` (and the other ``--lora-*`` flags) it plans LoRA fine-tuning: the frozen
base plus the adapters, gradients and optimizer state for the adapters only.

See docs/plan.md for what each number means.
"""

from __future__ import annotations

import argparse
import sys

from engine.planning.cost_model import format_plan
from engine.training.arguments import build_parser, parse_args


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(
        prog="plan.py", usage="%(prog)s --world-size N [the trainer's flags]", add_help=False
    )
    own.add_argument("--world-size", type=int, help="ranks (GPUs) in the job, e.g. 32")
    args, rest = own.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__.split("\n\n")[0] + "\n")
        own.print_help()
        print("\nThe trainer's flags:")
        build_parser().print_help()
        return 0
    if args.world_size is None:
        own.error("--world-size is required (the ranks in the job, e.g. --world-size 32)")
    job = parse_args(rest)
    try:
        print(format_plan(job, args.world_size))
    except ValueError as error:
        print(f"plan.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
