"""Memory per rank: DDP, ZeRO-1 and FSDP2 on one model; the output layer + cross entropy with
the whole logits and chunked.

    python benchmarks/memory.py [--dp-world 4] [--vocab 128256] [--hidden 512] [--tokens 2048]
                                [--chunk N] [--repeats 3]

**Data parallelism.** ``--dp-world`` gloo ranks (CPU processes) train one step of a fixed
LLaMA (``--dp-hidden`` 512, ``--dp-layers`` 4, vocabulary 8,000, float32) with this package's
DDP, with ZeRO-1 (``--use-distributed-optimizer``) and with FSDP2 (``--use-torch-fsdp2``).
Each rank counts the bytes of its weights, gradient buffers and optimizer state (Adam's
moments, and main parameters where they are copies). It also reports its peak RSS above what
it had before building the model. The maximum over the ranks is printed per mode.

**Output layer.** One process, one TP rank, float32. The output layer ``[vocab, hidden]``
and a loss over ``--tokens`` tokens, forward and backward, two ways:

- **whole**: the logits ``[tokens, vocab]``, then `vocab_parallel_cross_entropy` (which keeps
  the float32 softmax for backward): ``--cross-entropy-chunk-size 0``;
- **chunked**: `linear_cross_entropy`, ``--chunk`` tokens at a time (default: the model's
  default, `default_chunk_size`), with the trainer's loss (every token's loss gets the same
  gradient): the gradients are computed in the forward, the backward scales them;
- **recomputing**: the same with a different gradient per token (a loss of
  ``Σ w_i loss_i``): the backward recomputes each chunk's logits.

Per side:

- **saved bytes**: what autograd keeps between forward and backward (distinct storages,
  the inputs and the weight excluded);
- **peak bytes**: the forward + backward's own peak above what was allocated before it. On a
  GPU, CUDA's peak allocated memory. On a CPU, each side runs in a fresh process that reports
  its peak RSS above the RSS it had before: the allocator's own overhead included, so a ratio
  of ones below tens of MB says little;
- **step time**: forward + backward, the median of ``--repeats`` rounds that alternate the two
  sides, after a warm-up.

The ratios come last: ``zero1_over_ddp_state`` and ``fsdp2_over_ddp_state`` (weights +
gradients + optimizer state per rank), ``fsdp2_over_ddp_rss``, then ``peak_whole_over_chunked``
(how much less memory), ``time_chunked_over_whole`` and ``time_recomputing_over_whole`` (what
it costs), the last lines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import parallel_state  # noqa: E402
from engine.device import init_distributed  # noqa: E402
from engine.tensor_parallel import vocab_parallel_cross_entropy  # noqa: E402
from engine.tensor_parallel.linear_cross_entropy import (  # noqa: E402
    default_chunk_size,
    linear_cross_entropy,
)

SIDES = ("whole", "chunked", "recomputing")
MODES = ("ddp", "zero1", "fsdp2")


def _dp_rank(rank: int, args: argparse.Namespace, port: int, mode: str, queue) -> None:
    """One rank of a DP mode: one training step, then its bytes (max over ranks to rank 0)."""
    from engine.distributed import (
        DistributedDataParallel,
        FullyShardedDataParallel,
        finalize_model_grads,
    )
    from engine.distributed.config import DistributedDataParallelConfig
    from engine.models import LlamaModel, ModelConfig
    from engine.optimizer import build_optimizer
    from engine.optimizer.config import OptimizerConfig

    torch.set_num_threads(1)  # the ranks share this machine's cores
    names = [name for _, name in socket.if_nameindex()]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if "lo" in names else names[0])
    store = dist.TCPStore("127.0.0.1", port, args.dp_world, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=args.dp_world)
    parallel_state.initialize_model_parallel()
    rss_before = _rss_bytes()
    config = ModelConfig(
        num_layers=args.dp_layers, hidden_size=args.dp_hidden, num_attention_heads=8,
        ffn_hidden_size=args.dp_hidden * 11 // 4, vocab_size=8000,
        attention_backend="torch", norm_backend="torch",
    )  # fmt: skip
    ddp = DistributedDataParallelConfig(
        use_distributed_optimizer=mode == "zero1", use_torch_fsdp2=mode == "fsdp2"
    )
    model = LlamaModel(config)
    chunk = (FullyShardedDataParallel if mode == "fsdp2" else DistributedDataParallel)(model, ddp)
    optimizer = build_optimizer(OptimizerConfig(lr=1e-4), [chunk])
    tokens = torch.randint(0, 8000, (2, 129), generator=torch.Generator().manual_seed(rank))
    chunk(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
    finalize_model_grads([chunk])
    optimizer.step()
    params = list(model.parameters())
    if mode == "fsdp2":
        weights = sum(p.to_local().numel() * 4 for p in params)
        grads = sum(p.main_grad.numel() * 4 for p in params)
    else:
        weights = sum(p.numel() * p.element_size() for p in params)
        grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in chunk.grad_buffers)
    counts = torch.tensor(
        [weights + grads + optimizer.state_bytes(), _rss_bytes() - rss_before],
        dtype=torch.float64,
    )
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put(counts.tolist())
    # Free what holds the groups and their pending work before the groups go: a gloo work
    # object destroyed in the interpreter's teardown can abort the process.
    del chunk, model, optimizer, params
    gc.collect()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def data_parallel_bytes(args: argparse.Namespace) -> dict[str, list[float]]:
    """Mode -> [state bytes, peak RSS bytes above the start], each the maximum over ranks."""
    out = {}
    for mode in MODES:
        # The parent serves the rendezvous store on a port the OS picks (no race for one).
        store = dist.TCPStore("127.0.0.1", 0, args.dp_world, is_master=True,
                              wait_for_workers=False)  # fmt: skip
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_dp_rank, args=(args, store.port, mode, queue),
                           nprocs=args.dp_world, start_method="spawn")  # fmt: skip
        out[mode] = queue.get()
    return out


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
    if side == "recomputing":
        loss = loss * torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)
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
    parser.add_argument("--dp-world", type=int, default=4, help="ranks of the DP comparison")
    parser.add_argument("--dp-hidden", type=int, default=512)
    parser.add_argument("--dp-layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="tokens a chunk (default: the model's default for these sizes)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk is None:
        args.chunk = default_chunk_size(args.tokens, args.hidden, args.vocab) or args.tokens
    if args.child is not None:
        child(args)
        return
    dp = data_parallel_bytes(args)
    print(
        f"one step of a {args.dp_layers}-layer LLaMA (hidden {args.dp_hidden}, vocabulary "
        f"8,000, float32) on {args.dp_world} gloo ranks; maximum over the ranks"
    )
    for mode in MODES:
        state, rss = dp[mode]
        print(f"{mode}: weights + grads + optimizer {state / 2**20:.1f} MiB, peak RSS "
              f"{rss / 2**20:.1f} MiB above the start")  # fmt: skip
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
    print(f"zero1_over_ddp_state={dp['zero1'][0] / dp['ddp'][0]:.3f}")
    print(f"fsdp2_over_ddp_state={dp['fsdp2'][0] / dp['ddp'][0]:.3f}")
    print(f"fsdp2_over_ddp_rss={dp['fsdp2'][1] / max(dp['ddp'][1], 1):.3f}")
    for kind in ("saved", "peak"):
        ratio = memory["whole"][kind] / max(memory["chunked"][kind], 1)
        print(f"{kind}_whole_over_chunked={ratio:.2f}")
    for side in SIDES[1:]:
        ratio = statistics.median(times[side]) / statistics.median(times["whole"])
        print(f"time_{side}_over_whole={ratio:.3f}")


if __name__ == "__main__":
    main()
