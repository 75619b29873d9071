"""Train a LLaMA model: the entry point that `torchrun` launches (one process per device).

Megatron-LM's flags (`engine.training.arguments`), checked before any process group starts::

    torchrun --nproc-per-node 8 examples/pretrain.py --model-preset llama2-7b \\
        --tensor-model-parallel-size 8 --micro-batch-size 1 --global-batch-size 1024 \\
        --seq-length 4096 --bf16 --use-distributed-optimizer --train-iters 500000 \\
        --data-path data/corpus_text_document --tokenizer-type Llama2Tokenizer \\
        --tokenizer-model tokenizer.model --save ckpt --load ckpt

``--dry-run`` prints the memory / FLOPs plan for the world size and exits without training.
With ``--sft`` and ``--load`` it fine-tunes (`engine.training.loop.finetune`): weights from
``--load`` on the first start, its own checkpoints in ``--save`` after that.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.training.arguments import parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    job = parse_args(argv, world_size=world_size)  # exits with a usage error naming the flag
    if job.training.dry_run:
        from engine.planning.cost_model import format_plan

        print(format_plan(job, world_size))
        return 0

    # Imported after the arguments are checked: a bad flag costs no torch.distributed start.
    import torch.distributed as dist

    from engine.training.loop import finetune, pretrain

    fine_tuning = job.data.sft and job.checkpoint.load is not None
    result = (finetune if fine_tuning else pretrain)(job)
    if dist.get_rank() == 0:
        last = result.losses[max(result.losses)] if result.losses else float("nan")
        print(
            f"done: iteration {result.iteration} | loss {last:.6E} | "
            f"skipped {result.skipped_steps} | stopped: {result.exit_reason or 'no'} | "
            f"checkpoint: {result.checkpoint or 'none'} | "
            f"tensorboard: {job.training.tensorboard_dir or 'none'}",
            flush=True,
        )
    # Every rank leaves together: a rank tearing its gloo/NCCL transport down while a peer is
    # still in a collective can abort the peer (seen on gloo under load).
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
