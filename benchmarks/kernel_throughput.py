"""Throughput of the Triton kernels against PyTorch (and flash-attn when installed), on a GPU.

    python benchmarks/kernel_throughput.py [--dtype bfloat16] [--quick] [--out-dir DIR]

Attention: TFLOP/s of forward, backward and both, head dim 128, sequence lengths 512..16K at a
constant 16K tokens per batch, causal and not, against PyTorch's SDPA restricted to its flash
backend (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``, the like-for-like peer), SDPA choosing its
own backend, and ``flash_attn.flash_attn_func``. FLOPs count the two matmuls of the forward,
4·B·H·Sq·Sk·D, halved when causal; the backward does 2.5 times that (five matmuls).

RMSNorm: GB/s over the bytes each pass must move (read x and write y forward; read x and dy
and write dx backward), against the PyTorch reference and against the memory bandwidth measured
in the same run (a device-to-device copy ``y.copy_(x)`` of 1 GiB timed with CUDA events, bytes
read + written per second): ``fraction_of_bandwidth`` is how close the kernel comes to it.

Each section ends with one summary line (``flash_attention ...``, ``rmsnorm ...``); the
sums over the shapes run give them (total work / total time). ``--quick`` measures only the
training case (causal, two sequence lengths, one hidden size: under a minute with tuning).
Writes ``kernels.csv``, ``kernels.md`` and, with matplotlib, ``kernels.png``. Without a GPU it
says so and exits 0; ``--cpu`` instead runs every section on the CPU at tiny shapes, with the
Triton kernels in Triton's interpreter, to test this script (its figures say nothing).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

QUERY_HEADS = 16


@dataclass(frozen=True)
class Shapes:
    """What one mode measures."""

    seq_lens: tuple[int, ...]
    tokens_per_batch: int
    head_dim: int
    causal: tuple[bool, ...]
    rmsnorm_hidden: tuple[int, ...]
    copy_bytes: int  # of the bandwidth copy's source (it moves twice that)
    providers: tuple[str, ...]  # attention peers besides ours, when available


FULL = Shapes(
    seq_lens=(512, 1024, 2048, 4096, 8192, 16384), tokens_per_batch=16384, head_dim=128,
    causal=(False, True), rmsnorm_hidden=(2048, 4096, 8192), copy_bytes=2**30,
    providers=("sdpa_flash", "sdpa", "flash_attn"),
)  # fmt: skip
# The training case only: causal, sequence lengths around the trainer's.
QUICK = Shapes(
    seq_lens=(2048, 8192), tokens_per_batch=16384, head_dim=128, causal=(True,),
    rmsnorm_hidden=(4096,), copy_bytes=2**30, providers=("sdpa_flash",),
)  # fmt: skip
# Triton's interpreter runs every program in Python: the smallest shapes the kernels take.
CPU = Shapes(
    seq_lens=(32,), tokens_per_batch=32, head_dim=16, causal=(True,), rmsnorm_hidden=(64,),
    copy_bytes=2**24, providers=("sdpa_flash",),
)  # fmt: skip
CPU_REPEATS = 1


def _bench_ms(fn: Callable[[], object], leaves: list[torch.Tensor], device: torch.device) -> float:
    """Median milliseconds per call; the leaves' .grad is reset between calls so gradient
    accumulation is not timed. On a GPU with Triton's warm-up and L2 flushing; on the CPU a
    few wall-clock calls after one warm-up."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=leaves)
    fn()
    times = []
    for _ in range(CPU_REPEATS):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure_copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    """GB/s of ``y.copy_(x)`` between two ``nbytes`` buffers on ``device``: bytes read plus
    written per second, the ceiling a memory-bound kernel such as RMSNorm is held to."""
    x = torch.ones(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):  # first-touch page faults and clock ramp-up stay out of the timing
        y.copy_(x)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            y.copy_(x)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / repeats
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            y.copy_(x)
        seconds = (time.perf_counter() - begin) / repeats
    return 2 * nbytes / seconds / 1e9


def _sdpa_flash(q, k, v, causal: bool, gqa: bool) -> torch.Tensor:
    """SDPA held to its flash backend: it raises instead of falling back to another one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def _attention_providers(kv_heads: int, peers: tuple[str, ...]) -> dict[str, Callable]:
    """name -> fn(q, k, v, causal) taking SDPA's [B, H, S, D] layout: ours, then the peers
    that are available."""
    from kernels.flash_attention import flash_attn_func

    gqa = kv_heads != QUERY_HEADS
    providers: dict[str, Callable] = {
        "triton": lambda q, k, v, causal: flash_attn_func(q, k, v, is_causal=causal),
        "sdpa_flash": partial(_sdpa_flash, gqa=gqa),
        "sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=gqa
        ),
    }
    if "flash_attn" in peers and importlib.util.find_spec("flash_attn") is not None:
        dao_flash_attn = importlib.import_module("flash_attn").flash_attn_func

        providers["flash_attn"] = lambda q, k, v, causal: dao_flash_attn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    return {name: fn for name, fn in providers.items() if name == "triton" or name in peers}


def _time_passes(
    forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], device: torch.device
) -> dict[str, float]:
    """Milliseconds of the forward, the backward (through a retained graph) and both."""
    out = forward()
    grad = torch.randn_like(out)
    return {
        "forward": _bench_ms(forward, leaves, device),
        "backward": _bench_ms(partial(out.backward, grad, retain_graph=True), leaves, device),
        "forward+backward": _bench_ms(lambda: forward().backward(grad), leaves, device),
    }


# Work of each pass relative to the forward: attention's backward does 5 matmuls to the
# forward's 2; RMSNorm moves 2 tensors of x's size forward (x, y) and 3 backward (x, dy, dx).
ATTENTION_FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}
RMSNORM_TENSORS_MOVED = {"forward": 2, "backward": 3, "forward+backward": 5}


def bench_attention(
    dtype: torch.dtype, kv_heads: int, shapes: Shapes, device: torch.device
) -> list[dict]:
    """One row per (provider, causal, seq, pass) with milliseconds and TFLOP/s. A peer that
    refuses a shape (e.g. SDPA's flash backend on a GPU it does not support) is named and
    left out."""
    rows = []
    for name, attend in _attention_providers(kv_heads, shapes.providers).items():
        for causal in shapes.causal:
            for seq in shapes.seq_lens:
                batch = max(1, shapes.tokens_per_batch // seq)
                d = shapes.head_dim
                q = torch.randn(batch, QUERY_HEADS, seq, d, device=device, dtype=dtype)
                k = torch.randn(batch, kv_heads, seq, d, device=device, dtype=dtype)
                v = torch.randn_like(k)
                leaves = [t.requires_grad_() for t in (q, k, v)]
                forward_flops = 4 * batch * QUERY_HEADS * seq * seq * d / (2 if causal else 1)
                try:
                    timings = _time_passes(partial(attend, q, k, v, causal), leaves, device)
                except RuntimeError as error:
                    reason = str(error).strip().splitlines()[0][:160]
                    print(f"attention {name} causal={causal} seq={seq}: unavailable ({reason})")
                    continue
                for pass_name, ms in timings.items():
                    tflops = forward_flops * ATTENTION_FLOP_FACTOR[pass_name] / ms / 1e9
                    rows.append(
                        dict(kernel="attention", provider=name, causal=causal, seq=seq,
                             batch=batch, size=d, pass_=pass_name, ms=_sig(ms),
                             throughput=_sig(tflops), unit="TFLOP/s",
                             work=forward_flops * ATTENTION_FLOP_FACTOR[pass_name])
                    )  # fmt: skip
                print(f"attention {name:10s} causal={causal!s:5s} seq={seq:5d} done", flush=True)
    return rows


def bench_rmsnorm(dtype: torch.dtype, shapes: Shapes, device: torch.device) -> list[dict]:
    """One row per (provider, hidden, pass) with milliseconds and GB/s."""
    from kernels.reference import rms_norm_reference
    from kernels.rmsnorm import rms_norm

    # Without a residual both return the normalised tensor alone.
    norms = {"triton": rms_norm, "torch": rms_norm_reference}
    rows = []
    for name, norm in cast(dict[str, Callable[..., torch.Tensor]], norms).items():
        for hidden in shapes.rmsnorm_hidden:
            x = torch.randn(shapes.tokens_per_batch, hidden, device=device, dtype=dtype)
            weight = torch.ones(hidden, device=device, dtype=dtype)
            leaves = [x.requires_grad_(), weight.requires_grad_()]
            timings = _time_passes(partial(norm, x, weight, 1e-6), leaves, device)
            for pass_name, ms in timings.items():
                moved = RMSNORM_TENSORS_MOVED[pass_name] * x.numel() * x.element_size()
                rows.append(
                    dict(kernel="rmsnorm", provider=name, causal="", seq=shapes.tokens_per_batch,
                         batch=1, size=hidden, pass_=pass_name, ms=_sig(ms),
                         throughput=_sig(moved / ms / 1e6), unit="GB/s", work=moved)
                )  # fmt: skip
    return rows


def _sig(x: float) -> float:
    """Four significant figures: the table stays readable at GPU and at interpreter speeds."""
    return float(f"{x:.4g}")


def _rate(rows: list[dict], provider: str, pass_name: str, keys: set | None = None) -> float:
    """Total work over total time of one provider's rows of one pass, in the rows' unit (so
    each shape weighs by its cost); over the shapes in ``keys`` when given."""
    chosen = [
        r
        for r in rows
        if r["provider"] == provider
        and r["pass_"] == pass_name
        and (keys is None or (r["causal"], r["seq"], r["size"]) in keys)
    ]
    total_ms = sum(r["ms"] for r in chosen)
    scale = 1e9 if chosen and chosen[0]["unit"] == "TFLOP/s" else 1e6  # per ms -> T or G per s
    return sum(r["work"] for r in chosen) / total_ms / scale if total_ms else float("nan")


def _shape_keys(rows: list[dict], provider: str) -> set:
    return {(r["causal"], r["seq"], r["size"]) for r in rows if r["provider"] == provider}


def attention_summary(rows: list[dict], dtype_name: str) -> str:
    """One line: our forward and backward TFLOP/s, SDPA flash's on the same shapes, and the
    ratio of their forward+backward times (above 1: ours is faster)."""
    ours = {p: _rate(rows, "triton", p) for p in ("forward", "backward")}
    line = (
        f"flash_attention dtype={dtype_name} fwd_tflops={ours['forward']:.4g} "
        f"bwd_tflops={ours['backward']:.4g}"
    )
    common = _shape_keys(rows, "triton") & _shape_keys(rows, "sdpa_flash")
    if not common:
        return line + " ratio_vs_sdpa_flash=n/a (SDPA's flash backend ran no shape)"
    peer = {p: _rate(rows, "sdpa_flash", p, common) for p in ("forward", "backward")}
    ratio = _rate(rows, "triton", "forward+backward", common) / _rate(
        rows, "sdpa_flash", "forward+backward", common
    )
    return (
        f"{line} sdpa_flash_fwd_tflops={peer['forward']:.4g} "
        f"sdpa_flash_bwd_tflops={peer['backward']:.4g} ratio_vs_sdpa_flash={ratio:.3g}"
    )


def rmsnorm_summary(rows: list[dict], copy_gbps: float) -> str:
    """One line: our forward and backward GB/s, the copy bandwidth measured in this run, our
    forward+backward GB/s as a fraction of it, and the speed-up over the PyTorch reference."""
    fwd, bwd = _rate(rows, "triton", "forward"), _rate(rows, "triton", "backward")
    both = _rate(rows, "triton", "forward+backward")
    ratio = both / _rate(rows, "torch", "forward+backward")
    return (
        f"rmsnorm fwd_gbps={fwd:.4g} bwd_gbps={bwd:.4g} copy_gbps={copy_gbps:.4g} "
        f"fraction_of_bandwidth={both / copy_gbps:.3g} ratio_vs_torch={ratio:.3g}"
    )


def save(rows: list[dict], out_dir: Path) -> None:
    """CSV and markdown tables, and a plot when matplotlib is there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with open(out_dir / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(str(r[k]) for k in fields) + " |" for r in rows]
    (out_dir / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib not installed: no plot")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention = [r for r in rows if r["kernel"] == "attention"]
    causal_values = sorted({r["causal"] for r in attention})
    passes = ("forward", "backward", "forward+backward")
    fig, axes = plt.subplots(len(causal_values), 3, figsize=(15, 4 * len(causal_values)),
                             sharex=True, squeeze=False)  # fmt: skip
    for row_axes, causal in zip(axes, causal_values, strict=True):
        for ax, pass_name in zip(row_axes, passes, strict=True):
            for provider in sorted({r["provider"] for r in attention}):
                points = [
                    (r["seq"], r["throughput"])
                    for r in attention
                    if r["provider"] == provider and r["causal"] == causal
                    and r["pass_"] == pass_name
                ]  # fmt: skip
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=provider)
            ax.set(title=f"{pass_name}, {'causal' if causal else 'full'}", xscale="log",
                   xlabel="sequence length", ylabel="TFLOP/s")  # fmt: skip
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "kernels.png", dpi=120)
    print(f"wrote {out_dir / 'kernels.png'}")


def _interpret_on_cpu() -> None:
    """Make the Triton kernels run in Triton's interpreter: it must be chosen before the first
    ``import triton`` (the kernels are decorated for it then)."""
    value = os.environ.get("TRITON_INTERPRET")
    if value is not None and value.lower() not in ("1", "true", "on", "yes"):
        sys.exit(f"--cpu runs the kernels in Triton's interpreter; TRITON_INTERPRET={value}")
    if value is None and "triton" in sys.modules:
        sys.exit("--cpu: triton was imported before TRITON_INTERPRET could be set")
    os.environ["TRITON_INTERPRET"] = "1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"],
                        help="default bfloat16 on a GPU, float16 with --cpu")  # fmt: skip
    parser.add_argument("--kv-heads", type=int, default=QUERY_HEADS,
                        help=f"fewer than the {QUERY_HEADS} query heads means GQA")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="the training case only: causal, 2 sequence lengths, 1 hidden "
                        "size")  # fmt: skip
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU at tiny shapes, Triton interpreted: tests the "
                        "script, the figures mean nothing")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.kv_heads < 1 or QUERY_HEADS % args.kv_heads:
        parser.error(f"--kv-heads must divide the {QUERY_HEADS} query heads, got {args.kv_heads}")
    if args.cpu and args.dtype == "bfloat16":
        parser.error("--cpu --dtype bfloat16: Triton's interpreter cannot compute in bfloat16")
    if args.cpu:
        _interpret_on_cpu()
        device, shapes, dtype_name = torch.device("cpu"), CPU, args.dtype or "float16"
        print(f"CPU, Triton interpreted, {dtype_name}: tiny shapes, figures not meaningful")
    elif not torch.cuda.is_available():
        print("no CUDA GPU: the kernel benchmark measures GPU throughput; nothing to do")
        return 0
    else:
        device, dtype_name = torch.device("cuda"), args.dtype or "bfloat16"
        shapes = QUICK if args.quick else FULL
        print(f"{torch.cuda.get_device_name()}, {dtype_name}, head dim {shapes.head_dim}")
    dtype = getattr(torch, dtype_name)
    attention_rows = bench_attention(dtype, args.kv_heads, shapes, device)
    rmsnorm_rows = bench_rmsnorm(dtype, shapes, device)
    copy_gbps = measure_copy_bandwidth(device, shapes.copy_bytes)
    save(attention_rows + rmsnorm_rows, args.out_dir)
    print(attention_summary(attention_rows, dtype_name))
    print(rmsnorm_summary(rmsnorm_rows, copy_gbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
