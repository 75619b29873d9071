"""Model construction cost: one rank's share of a 7B-shaped LLaMA, built with the layout-free
init, built uninitialised (meta, then materialised: the path of a run that loads a
checkpoint), and as plain ``torch.empty`` + ``normal_`` of the same local shards.

    python benchmarks/init.py [--layers 2] [--tp 1,8] [--rounds 3]
                              [--hidden 4096 --heads 32 --ffn 11008 --vocab 32000]
                              [--load-dir /tmp]

Each TP size runs in a real gloo world of that many processes (the parallel state of a TP
group of that size); rank 0 measures while the others wait, so the figures are one rank's work
alone, as on a node where every rank has its own cores. The layout-free init draws every full
weight (seeded by its canonical name, so that all layouts agree) and keeps this rank's slice:
its cost does not shrink with TP, while the plain init of the local shards does.

At TP=1 the load path is measured too: the model is saved once under ``--load-dir`` and loaded
back into a model built either way (``initialised_then_load_s``, ``meta_then_load_s``).

Rounds alternate the order of the sides (the machine may be shared: each side is timed in
both positions); the best of the rounds is printed. One line per TP size, each ending
``ratio_vs_plain=X.XX`` (layout-free over plain: what the layout-free property costs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import parallel_state  # noqa: E402
from engine.checkpointing import load_checkpoint, save_checkpoint  # noqa: E402
from engine.models import ModelConfig  # noqa: E402
from engine.models.build import build_model_chunks  # noqa: E402


def model_config(args: argparse.Namespace) -> ModelConfig:
    """LLaMA-2 7B's widths (by default) with ``--layers`` layers."""
    return ModelConfig.from_preset(
        "tiny", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=4096,
    )  # fmt: skip


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes (what it builds freed after)."""
    gc.collect()
    start = time.perf_counter()
    built = fn()
    seconds = time.perf_counter() - start
    del built
    gc.collect()
    return seconds


def measure(config: ModelConfig, rounds: int, load_dir: str | None) -> dict[str, float]:
    """Best seconds of each side over ``rounds``, in alternating orders (this rank alone)."""
    (meta,) = build_model_chunks(config, initialise=False)
    shapes = [(tuple(p.shape), p.dtype) for p in meta.parameters()]
    local = sum(torch.Size(shape).numel() for shape, _ in shapes)
    del meta

    def plain() -> list[torch.Tensor]:
        return [torch.empty(shape, dtype=dtype).normal_(0.0, 0.02) for shape, dtype in shapes]

    sides: dict[str, Callable[[], object]] = {
        "layout_free": lambda: build_model_chunks(config),
        "meta": lambda: build_model_chunks(config, initialise=False),
        "plain": plain,
    }
    if load_dir is not None:
        save_checkpoint(load_dir, 1, build_model_chunks(config), None, None, 0, save_rng=False)
        for name, initialise in (("initialised_then_load", True), ("meta_then_load", False)):
            sides[name] = lambda initialise=initialise: load_checkpoint(  # type: ignore[misc]
                load_dir, build_model_chunks(config, initialise=initialise), load_rng=False
            )
    best = {name: float("inf") for name in sides}
    for round_ in range(rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for name in order:
            best[name] = min(best[name], timed(sides[name]))
    return {"local_params": float(local), **best}


def rank_main(rank: int, world: int, args: argparse.Namespace, store: str, out: str) -> None:
    """One rank of a TP group of ``world``: rank 0 measures, the others wait."""
    if rank != 0:
        torch.set_num_threads(1)  # waiting only
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world, 1)
    try:
        if rank == 0:
            with contextlib.ExitStack() as stack:
                load_dir = None
                if world == 1:
                    load_dir = stack.enter_context(
                        tempfile.TemporaryDirectory(prefix="init_benchmark_", dir=args.load_dir)
                    )
                result = measure(model_config(args), args.rounds, load_dir)
            Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_tp(world: int, args: argparse.Namespace) -> dict[str, float]:
    """Measure one rank of a TP group of ``world`` real gloo processes."""
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "result.json")
        mp.start_processes(rank_main, args=(world, args, store, out), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return json.loads(Path(out).read_text())


def tp_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tp {text!r}: expected sizes like 1,8") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--tp {text!r}: sizes must be >= 1")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (7B has 32)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=tp_sizes, default=[1, 8], help="TP sizes, e.g. 1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--load-dir", default=tempfile.gettempdir(),
        help="where the TP=1 checkpoint of the load path is written (removed after)",
    )  # fmt: skip
    args = parser.parse_args()
    for size in args.tp:
        if args.heads % size or args.ffn % size:
            parser.error(f"--tp {size} must divide --heads {args.heads} and --ffn {args.ffn}")
    print(
        f"LLaMA: h={args.hidden} heads={args.heads} ffn={args.ffn} vocab={args.vocab} "
        f"layers={args.layers}, float32; {torch.get_num_threads()} threads; best of "
        f"{args.rounds} alternating rounds"
    )
    for size in args.tp:
        r = run_tp(size, args)
        line = (
            f"tp={size} local_params={int(r['local_params'])} "
            f"layout_free_s={r['layout_free']:.3f} meta_s={r['meta']:.4f} "
            f"plain_s={r['plain']:.3f}"
        )
        if "meta_then_load" in r:
            line += (
                f" initialised_then_load_s={r['initialised_then_load']:.3f}"
                f" meta_then_load_s={r['meta_then_load']:.3f}"
            )
        print(f"{line} ratio_vs_plain={r['layout_free'] / r['plain']:.2f}", flush=True)


if __name__ == "__main__":
    main()
