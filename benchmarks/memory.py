"""Memory of the output layer + cross entropy, with the whole logits and chunked.

    python benchmarks/memory.py [--vocab 128256] [--hidden 512] [--tokens 2048]
                                [--chunk 256] [--repeats 3]

One process, one TP rank, float32. The output layer ``[vocab, hidden]`` and a loss over
``--tokens`` tokens, forward and backward, two ways:

- **whole**: the logits ``[tokens, vocab]``, then `vocab_parallel_cross_entropy` (which keeps
  the float32 softmax for backward): what the model did before `--cross-entropy-chunk-size`;
- **chunked**: `linear_cross_entropy`, ``--chunk`` tokens at a time (the backward recomputes
  each chunk's logits).

Per side:

- **saved bytes**: what autograd keeps between forward and backward (distinct storages,
  the inputs and the weight excluded);
- **peak bytes**: the forward + backward's own peak above what was allocated before it. On a
  GPU, CUDA's peak allocated memory. On a CPU, each side runs in a fresh process that reports
  its peak RSS above the RSS it had before: the allocator's own overhead included, so a ratio
  of ones below tens of MB says little;
- **step time**: forward + backward, the median of ``--repeats`` rounds that alternate the two
  sides, after a warm-up.

The ratios come last: ``peak_whole_over_chunked`` (how much less memory) and
``time_chunked_over_whole`` (what it costs), the last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import parallel_state  # noqa: E402
from engine.device import init_distributed  # noqa: E402
from engine.tensor_parallel import vocab_parallel_cross_entropy  # noqa: E402
from engine.tensor_parallel.linear_cross_entropy import linear_cross_entropy  # noqa: E402

SIDES = ("whole", "chunked")


def _inputs(args: argparse.Namespace, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) * 0.02).to(device)
    x = torch.randn(args.tokens, 1, args.hidden, generator=generator).to(device)
    target = torch.randint(0, args.vocab, (args.tokens, 1), generator=generator).to(device)
    return x.requires_grad_(), weight.requires_grad_(), target


def _step(side: str, x, weight, target, chunk: int) -> int:
    """Forward + backward of one side; returns the bytes autograd saved in between."""
    saved: dict[int, int] = {}
    excluded = {t.untyped_storage().data_ptr() for t in (x, weight, target)}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if side == "whole":
            loss = vocab_parallel_cross_entropy(F.linear(x, weight), target)
        else:
            loss = linear_cross_entropy(x, weight, target, None, chunk)
    loss.sum().backward()
    x.grad = weight.grad = None
    return sum(saved.values())


def _rss_bytes() -> int:
    """Peak RSS so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)


def child(args: argparse.Namespace) -> None:
    """One side in this process: its saved bytes and its peak above the start (printed as JSON)."""
    device = init_distributed()
    parallel_state.initialize_model_parallel()
    x, weight, target = _inputs(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_bytes()
    saved = _step(args.child, x, weight, target, args.chunk)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _rss_bytes() - before
    print(json.dumps({"saved": saved, "peak": peak}))


def _measure_in_child(side: str, argv: list[str]) -> dict:
    command = [sys.executable, __file__, *argv, "--child", side]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    argv = [f"--vocab={args.vocab}", f"--hidden={args.hidden}", f"--tokens={args.tokens}",
            f"--chunk={args.chunk}"]  # fmt: skip
    memory = {side: _measure_in_child(side, argv) for side in SIDES}

    device = init_distributed()
    parallel_state.initialize_model_parallel()
    x, weight, target = _inputs(args, device)
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for side in SIDES:  # warm-up
        _step(side, x, weight, target, args.chunk)
    for round_ in range(args.repeats):
        order = SIDES if round_ % 2 == 0 else SIDES[::-1]
        for side in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _step(side, x, weight, target, args.chunk)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - start)
    print(
        f"output layer + loss: vocab {args.vocab}, hidden {args.hidden}, {args.tokens} tokens, "
        f"chunk {args.chunk}, float32 on {device.type}; median of {args.repeats}"
    )
    for side in SIDES:
        print(
            f"{side}: saved {memory[side]['saved'] / 2**20:.1f} MiB, peak "
            f"{memory[side]['peak'] / 2**20:.1f} MiB, step {statistics.median(times[side]):.3f} s"
        )
    for kind in ("saved", "peak"):
        ratio = memory["whole"][kind] / max(memory["chunked"][kind], 1)
        print(f"{kind}_whole_over_chunked={ratio:.2f}")
    ratio = statistics.median(times["chunked"]) / statistics.median(times["whole"])
    print(f"time_chunked_over_whole={ratio:.3f}")


if __name__ == "__main__":
    main()
