"""Pretrain a LLaMA model; the entry point that `torchrun` launches.

For now it trains on a small fixed set of random token sequences (the model learns to
reproduce them, so the loss falls) under tensor parallelism; the trainer replaces the data
and the loop with the real ones. Run on two CPU processes:

    torchrun --standalone --nproc-per-node 2 examples/pretrain.py \
        --tensor-model-parallel-size 2 --model-preset tiny --train-iters 30
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from engine import parallel_state
from engine.config import ModelConfig, ParallelConfig, validate
from engine.device import init_distributed
from engine.distributed import finalize_model_grads
from engine.models import LlamaModel
from engine.tensor_parallel import model_parallel_seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-preset", default="tiny")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--train-iters", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--log-interval", type=int, default=5)
    return parser.parse_args(argv)


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the gradients: TP shards summed, replicated tensors counted once."""
    squares = torch.zeros(1)
    first_tp_rank = parallel_state.get_tensor_model_parallel_rank() == 0
    for param in model.parameters():
        if getattr(param, "tensor_model_parallel", False) or first_tp_rank:
            squares += param.grad.float().pow(2).sum().cpu()
    dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
    return squares.sqrt().item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tp = args.tensor_model_parallel_size
    config = ModelConfig.from_preset(args.model_preset, sequence_parallel=args.sequence_parallel)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(config, ParallelConfig(tp), world_size=world_size, seq_length=args.seq_length)
    if world_size != tp:
        raise SystemExit(
            f"this example runs tensor parallelism only: launch exactly "
            f"--tensor-model-parallel-size ({tp}) processes, not {world_size}"
        )

    device = init_distributed()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_seed(args.seed)
    model = LlamaModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    # Eight fixed sequences, identical on every rank (TP ranks must see the same tokens).
    generator = torch.Generator().manual_seed(args.seed)
    corpus = torch.randint(0, config.vocab_size, (8, args.seq_length + 1), generator=generator)
    tokens_per_iter = args.micro_batch_size * args.seq_length
    last_log = time.perf_counter()
    for iteration in range(1, args.train_iters + 1):
        rows = torch.arange(
            iteration * args.micro_batch_size, (iteration + 1) * args.micro_batch_size
        )
        batch = corpus[rows % corpus.size(0)].to(device)
        loss = model(batch[:, :-1], labels=batch[:, 1:]).mean()
        loss.backward()
        finalize_model_grads([model])
        norm = grad_norm(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if iteration % args.log_interval == 0 and dist.get_rank() == 0:
            elapsed = time.perf_counter() - last_log
            last_log = time.perf_counter()
            print(
                f"iteration {iteration}/{args.train_iters} | loss {loss.item():.6E} | "
                f"lr {args.lr:.3E} | grad norm {norm:.3f} | "
                f"tokens/s {tokens_per_iter * args.log_interval / elapsed:.0f}",
                flush=True,
            )
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
