"""Context parallelism (ring attention): the causal load balance of the split, counted, and the
ring's exposed communication, timed.

    python benchmarks/context_parallel.py [--cp-sizes 2,4,8 --world-size 2 --seq 1024 \\
        --heads 8 --kv-heads 2 --head-dim 64 --batch 1 --repeats 5]

**Load balance** (counted, not timed): for each CP size of ``--cp-sizes``, the causal (query,
key) pairs each rank computes for a ``--seq`` token sequence (attention FLOPs are ``4·d`` times
this, per head and sequence), max over min across the ranks:

- the load-balanced split of `engine.context_parallel.split` (rank r holds chunks r and
  ``2·CP-1-r`` of ``2·CP``): the sum of `RingStep.pairs` over the rank's `ring_steps`, the
  schedule `ring_attention` runs; 1.000 means every rank does the same work;
- a naive contiguous split (rank r holds tokens ``[r·s/cp, (r+1)·s/cp)``): each row attends to
  the keys up to itself, so the last rank does about ``2·CP-1`` times the first rank's work.

**Exposed communication** (timed): ``--world-size`` gloo ranks on this machine (CP = world size,
one intra-op thread each) time the forward + backward of `ring_attention` on random float32
q/k/v (``[b, heads, s/cp, d]``, K/V with ``--kv-heads``) against the same block computations
without communication: the same `BLOCK_BACKENDS["torch"]` forward and backward for every step
of `ring_steps` on locally held tensors of the blocks' shapes, merged with `merge_block`. The two
sides alternate for ``--repeats`` rounds after one warm-up; each rank takes the median of each,
and rank 0 reports the max over the ranks (the slowest rank sets the step time). The exposed
share is ``100·(ring - compute only)/ring``.

On gloo/CPU the exposed share is high: the "communication" is memory copies and socket work of
gloo's threads on the same cores the block attention needs, so it competes with the compute
instead of hiding behind it, and nearly all of it shows. It is highest at short sequences, where
the fixed cost of a hop dwarfs the block attention (block compute grows as c², a hop as c), and
noisy on a shared machine. On GPUs the hops run on the interconnect's copy engines while the
block attention of the step computes (`ring_attention` starts each hop before computing), so at
long enough sequences almost none of them is exposed.

Printed: one ``cp=N balanced_max_over_min=X.XXX contiguous_max_over_min=X.XXX`` line per CP
size, then the timing's ``ring_s=X.XXXX``, ``compute_only_s=X.XXXX`` (seconds) and the last line
``exposed_comm_pct=X.X``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import parallel_state  # noqa: E402
from engine.context_parallel import (  # noqa: E402
    BLOCK_BACKENDS,
    merge_block,
    ring_attention,
    ring_steps,
)
from engine.context_parallel.blocks import BlockAttention  # noqa: E402


def balanced_pairs(seq: int, cp_size: int) -> list[int]:
    """Causal (query, key) pairs per head and sequence of every rank under the load-balanced
    split: the pairs of the steps of its ring."""
    chunk = seq // (2 * cp_size)
    return [sum(step.pairs(chunk) for step in ring_steps(r, cp_size)) for r in range(cp_size)]


def contiguous_pairs(seq: int, cp_size: int) -> list[int]:
    """The same for a contiguous split: row i attends to keys 0..i, so rank r's slice
    ``[a, b)`` computes ``(a+1) + ... + b`` pairs."""
    width = seq // cp_size
    out = []
    for r in range(cp_size):
        a, b = r * width, (r + 1) * width
        out.append((b * (b + 1) - a * (a + 1)) // 2)
    return out


def load_balance_lines(seq: int, cp_sizes: list[int]) -> list[str]:
    """One ``cp=N balanced_max_over_min=... contiguous_max_over_min=...`` line per CP size."""
    lines = []
    for cp in cp_sizes:
        if seq % (2 * cp) != 0:
            raise SystemExit(f"--seq {seq} must be divisible by 2 x CP = {2 * cp}")
        balanced, contiguous = balanced_pairs(seq, cp), contiguous_pairs(seq, cp)
        # Both splits must cover the whole causal triangle exactly once, or the ratios compare
        # different amounts of work.
        total = seq * (seq + 1) // 2
        assert sum(balanced) == total == sum(contiguous), (cp, balanced, contiguous, total)
        lines.append(
            f"cp={cp} balanced_max_over_min={max(balanced) / min(balanced):.3f} "
            f"contiguous_max_over_min={max(contiguous) / min(contiguous):.3f}"
        )
    return lines


def compute_only(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, block: BlockAttention,
    rank: int, size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward and backward of the ring's block computations with the hops left out: every step
    attends to the local K/V (a block of the same shape as the one the ring would have), with
    the same query/key slices, merges and float32 accumulations as `ring_attention`."""
    chunk = q.size(2) // 2
    kv = torch.stack([k, v])  # as the ring does: its message is one stacked tensor
    early: tuple = (None, None)
    late: tuple = (None, None)
    steps = ring_steps(rank, size)
    for step in steps:
        keys = kv[:, :, :, :chunk] if step.early_keys_only else kv
        queries = q[:, :, chunk:] if step.late_queries_only else q
        out, lse = block.forward(queries, keys[0], keys[1], step.causal, scale)
        if step.late_queries_only:
            late = merge_block(*late, out, lse)
        else:
            early = merge_block(*early, out[:, :, :chunk], lse[..., :chunk])
            late = merge_block(*late, out[:, :, chunk:], lse[..., chunk:])
    out = torch.cat([early[0], late[0]], dim=2).to(q.dtype)
    lse = torch.cat([early[1], late[1]], dim=-1)

    dq = torch.zeros(q.shape, dtype=torch.float32)
    dkv = torch.zeros(kv.shape, dtype=torch.float32)  # one accumulator, never sent anywhere
    for step in steps:
        rows = slice(chunk, None) if step.late_queries_only else slice(None)
        keys = kv[:, :, :, :chunk] if step.early_keys_only else kv
        dq_block, dk_block, dv_block = block.backward(
            dout[:, :, rows], q[:, :, rows], keys[0], keys[1], out[:, :, rows], lse[..., rows],
            step.causal, scale,
        )  # fmt: skip
        dq[:, :, rows] += dq_block
        cols = slice(None, chunk) if step.early_keys_only else slice(None)
        dkv[0][:, :, cols] += dk_block
        dkv[1][:, :, cols] += dv_block
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _seconds(fn: Callable[[], object]) -> float:
    # Ranks start each measurement together: a rank still busy with the previous one would
    # take a core from the others (and, in the ring, make them wait).
    dist.barrier()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _rank_main(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    torch.set_num_threads(1)  # the ranks share this machine's cores
    names = [name for _, name in socket.if_nameindex()]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if "lo" in names else names[0])
    size = args.world_size
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size)
    parallel_state.initialize_model_parallel(context_parallel_size=size)
    group = parallel_state.get_context_parallel_group()
    block = BLOCK_BACKENDS["torch"]

    local = args.seq // size
    generator = torch.Generator().manual_seed(rank)

    def randn(heads: int) -> torch.Tensor:
        shape = (args.batch, heads, local, args.head_dim)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    q, k, v, dout = randn(args.heads), randn(args.kv_heads), randn(args.kv_heads), randn(args.heads)
    scale = args.head_dim**-0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def ring() -> None:
        for t in leaves:
            t.grad = None
        ring_attention(*leaves, block, group, scale).backward(dout)

    def local_only() -> None:
        compute_only(q, k, v, dout, block, rank, size, scale)

    sides = {"ring": ring, "compute_only": local_only}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():  # warm-up: allocator, gloo connections, first-call overheads
        _seconds(fn)
    for round_ in range(args.repeats):
        # Alternate the order so that both sides see the same machine state on average.
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for name in order:
            times[name].append(_seconds(sides[name]))
    medians = torch.tensor([statistics.median(times[n]) for n in sides], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put(dict(zip(sides, medians.tolist(), strict=True)))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cp-sizes", default="2,4,8", help="CP sizes of the load-balance count")
    parser.add_argument("--world-size", type=int, default=2, help="ranks (= CP) of the timing")
    parser.add_argument("--seq", type=int, default=1024, help="tokens of the whole sequence")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cp_sizes = [int(x) for x in args.cp_sizes.split(",")]
    if args.world_size < 2:
        parser.error("--world-size must be at least 2 (a ring needs two ranks)")
    if args.seq % (2 * args.world_size) != 0:
        parser.error(f"--seq must be divisible by 2 x --world-size = {2 * args.world_size}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.heads % args.kv_heads != 0:
        parser.error("--heads must be a multiple of --kv-heads")

    # Counted first: it needs no ranks, and it stands even if the timing cannot start.
    print(f"causal (query, key) pairs per rank, seq={args.seq}: max/min over the ranks")
    for line in load_balance_lines(args.seq, cp_sizes):
        print(line, flush=True)

    # The parent serves the rendezvous store on a port the OS picks (no race for a free port).
    store = dist.TCPStore("127.0.0.1", 0, args.world_size, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank_main, args=(args, store.port, queue), nprocs=args.world_size,
                       start_method="spawn")  # fmt: skip
    medians = queue.get()
    chunk = args.seq // (2 * args.world_size)
    pairs = balanced_pairs(args.seq, args.world_size)[0]
    gflop = 4 * args.head_dim * pairs * args.heads * args.batch / 1e9
    print(
        f"ring attention fwd+bwd: CP={args.world_size} gloo ranks, seq {args.seq} "
        f"({2 * chunk} tokens a rank), heads {args.heads}/{args.kv_heads}, d {args.head_dim}, "
        f"batch {args.batch}, float32; {gflop:.3f} forward GFLOP a rank; median of "
        f"{args.repeats}, max over ranks"
    )
    ring, compute = medians["ring"], medians["compute_only"]
    print(f"ring_s={ring:.4f}")
    print(f"compute_only_s={compute:.4f}")
    print(f"exposed_comm_pct={100 * (ring - compute) / ring:.1f}")


if __name__ == "__main__":
    main()
