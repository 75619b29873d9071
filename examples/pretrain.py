"""Train a LLaMA model: the entry point that `torchrun` launches (one process per device).

Megatron-LM's flags (`engine.training.arguments`), checked before any process group starts::

    torchrun --nproc-per-node 8 examples/pretrain.py --model-preset llama2-7b \\
        --tensor-model-parallel-size 8 --micro-batch-size 1 --global-batch-size 1024 \\
        --seq-length 4096 --bf16 --use-distributed-optimizer --train-iters 500000 \\
        --data-path data/corpus_text_document --tokenizer-type Llama2Tokenizer \\
        --tokenizer-model tokenizer.model --save ckpt --load ckpt

``--dry-run`` prints the memory / FLOPs plan for the world size and exits without training;
it exits with 1 if a data file, the tokenizer model or a LoRA run's base checkpoint is
missing (naming it).
With ``--sft`` and ``--load`` it fine-tunes (`engine.training.loop.finetune`): weights from
``--load`` on the first start, its own checkpoints in ``--save`` after that.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.training.arguments import parse_args  # noqa: E402
from engine.training.config import JobConfig  # noqa: E402


def missing_inputs(job: JobConfig) -> list[str]:
    """The inputs that ``--dry-run`` finds missing: each ``--data-path`` prefix's ``.bin`` and
    ``.idx`` (every prefix of a blend; for ``--sft`` a JSONL file, or the tokens and loss-mask
    datasets of a prefix), the ``--tokenizer-model`` and a LoRA run's
    ``--pretrained-checkpoint`` (a directory holding a checkpoint); each named with its flag."""
    from engine.checkpointing import read_latest_iteration
    from engine.data.blended_dataset import parse_data_path

    data, paths = job.data, job.data.data_path
    if data.sft and paths:  # the last path: a JSONL file, or a preprocessed prefix
        last = paths[-1]
        files, prefixes = ([last], []) if last.endswith(".jsonl") else (
            [], [f"{last}_tokens_document", f"{last}_loss_mask_document"]
        )  # fmt: skip
    else:
        files, prefixes = [], parse_data_path(paths)[0] if paths else []
    missing = [f"--data-path: {file} does not exist" for file in files if not os.path.isfile(file)]
    for prefix in prefixes:
        absent = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
        if absent:
            missing.append(
                f"--data-path: {' and '.join(prefix + s for s in absent)} not found (the prefix "
                f"{prefix} is given without .bin/.idx; tools/preprocess_data.py writes them)"
            )
    if data.tokenizer_model is not None and not os.path.exists(data.tokenizer_model):
        missing.append(f"--tokenizer-model: {data.tokenizer_model} not found")
    base = job.checkpoint.pretrained_checkpoint
    if base is not None and not os.path.isdir(base):
        missing.append(f"--pretrained-checkpoint: {base} not found")
    elif base is not None and read_latest_iteration(base) is None:
        missing.append(f"--pretrained-checkpoint: {base} holds no checkpoint")
    return missing


def main(argv: list[str] | None = None) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    job = parse_args(argv, world_size=world_size)  # exits with a usage error naming the flag
    if job.training.dry_run:
        from engine.planning.cost_model import format_plan

        print(format_plan(job, world_size))
        missing = missing_inputs(job)
        for problem in missing:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if missing else 0

    # Imported after the arguments are checked: a bad flag costs no torch.distributed start.
    import torch.distributed as dist

    from engine.device import leave_distributed
    from engine.training.divergence import TrainingDivergedError
    from engine.training.liveness import CollectiveFailureError
    from engine.training.loop import finetune, pretrain

    fine_tuning = job.data.sft and job.checkpoint.load is not None
    try:
        result = (finetune if fine_tuning else pretrain)(job)
    except CollectiveFailureError as error:
        # Each rank's own view (its operation, the ranks it heard nothing from). No barrier:
        # the peers it waited for are dead or stalled.
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except TrainingDivergedError as error:  # raised alike on every rank: one says it
        if dist.get_rank() == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    if dist.get_rank() == 0:
        last = result.losses[max(result.losses)] if result.losses else float("nan")
        print(
            f"done: iteration {result.iteration} | loss {last:.6E} | "
            f"skipped {result.skipped_steps} | stopped: {result.exit_reason or 'no'} | "
            f"checkpoint: {result.checkpoint or 'none'} | "
            f"tensorboard: {job.training.tensorboard_dir or 'none'}",
            flush=True,
        )
    leave_distributed()  # together: see its docstring
    return 0


if __name__ == "__main__":
    sys.exit(main())
