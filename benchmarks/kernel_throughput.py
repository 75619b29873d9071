"""Throughput of the Triton kernels against PyTorch (and flash-attn when installed), on a GPU.

    python benchmarks/kernel_throughput.py [--dtype bfloat16] [--out-dir benchmarks/results]

Attention: TFLOP/s of forward, backward and both, head dim 128, sequence lengths 512..16K at a
constant 16K tokens per batch, causal and not, against ``scaled_dot_product_attention`` (which
picks its own fastest backend) and ``flash_attn.flash_attn_func``. FLOPs count the two matmuls
of the forward, 4·B·H·Sq·Sk·D, halved when causal; the backward does 2.5 times that (five
matmuls). RMSNorm: GB/s over the bytes each pass must move (read x and write y forward; read x
and dy and write dx backward), against the PyTorch reference. Writes ``kernels.csv``,
``kernels.md`` and, with matplotlib, ``kernels.png``. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS_PER_BATCH = 16384
HEAD_DIM = 128
QUERY_HEADS = 16
RMSNORM_HIDDEN = (2048, 4096, 8192)


def _bench_ms(fn: Callable[[], object], leaves: list[torch.Tensor]) -> float:
    """Median milliseconds per call, with Triton's warm-up and L2 flushing; the leaves' .grad
    is reset between calls so gradient accumulation is not timed."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=leaves)


def _attention_providers(kv_heads: int) -> dict[str, Callable]:
    """name -> fn(q, k, v, causal) taking SDPA's [B, H, S, D] layout."""
    from kernels.flash_attention import flash_attn_func

    providers = {
        "triton": lambda q, k, v, causal: flash_attn_func(q, k, v, is_causal=causal),
        "sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=kv_heads != QUERY_HEADS
        ),
    }
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func as dao_flash_attn

        providers["flash_attn"] = lambda q, k, v, causal: dao_flash_attn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    return providers


def _time_passes(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> dict:
    """Milliseconds of the forward, the backward (through a retained graph) and both."""
    out = forward()
    grad = torch.randn_like(out)
    return {
        "forward": _bench_ms(forward, leaves),
        "backward": _bench_ms(partial(out.backward, grad, retain_graph=True), leaves),
        "forward+backward": _bench_ms(lambda: forward().backward(grad), leaves),
    }


# Work of each pass relative to the forward: attention's backward does 5 matmuls to the
# forward's 2; RMSNorm moves 2 tensors of x's size forward (x, y) and 3 backward (x, dy, dx).
ATTENTION_FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}
RMSNORM_TENSORS_MOVED = {"forward": 2, "backward": 3, "forward+backward": 5}


def bench_attention(dtype: torch.dtype, kv_heads: int) -> list[dict]:
    """One row per (provider, causal, seq, pass) with milliseconds and TFLOP/s."""
    rows = []
    for name, attend in _attention_providers(kv_heads).items():
        for causal in (False, True):
            for seq in SEQ_LENS:
                batch = max(1, TOKENS_PER_BATCH // seq)
                q = torch.randn(batch, QUERY_HEADS, seq, HEAD_DIM, device="cuda", dtype=dtype)
                k = torch.randn(batch, kv_heads, seq, HEAD_DIM, device="cuda", dtype=dtype)
                v = torch.randn_like(k)
                leaves = [t.requires_grad_() for t in (q, k, v)]
                forward_flops = (
                    4 * batch * QUERY_HEADS * seq * seq * HEAD_DIM / (2 if causal else 1)
                )
                timings = _time_passes(partial(attend, q, k, v, causal), leaves)
                for pass_name, ms in timings.items():
                    tflops = forward_flops * ATTENTION_FLOP_FACTOR[pass_name] / ms / 1e9
                    rows.append(
                        dict(kernel="attention", provider=name, causal=causal, seq=seq,
                             batch=batch, size=HEAD_DIM, pass_=pass_name, ms=round(ms, 4),
                             throughput=round(tflops, 1), unit="TFLOP/s")
                    )  # fmt: skip
                print(f"attention {name:10s} causal={causal!s:5s} seq={seq:5d} done", flush=True)
    return rows


def bench_rmsnorm(dtype: torch.dtype) -> list[dict]:
    """One row per (provider, hidden, pass) with milliseconds and GB/s."""
    from kernels.reference import rms_norm_reference
    from kernels.rmsnorm import rms_norm

    rows = []
    for name, norm in (("triton", rms_norm), ("torch", rms_norm_reference)):
        for hidden in RMSNORM_HIDDEN:
            x = torch.randn(TOKENS_PER_BATCH, hidden, device="cuda", dtype=dtype)
            weight = torch.ones(hidden, device="cuda", dtype=dtype)
            leaves = [x.requires_grad_(), weight.requires_grad_()]
            for pass_name, ms in _time_passes(partial(norm, x, weight, 1e-6), leaves).items():
                moved = RMSNORM_TENSORS_MOVED[pass_name] * x.numel() * x.element_size()
                rows.append(
                    dict(kernel="rmsnorm", provider=name, causal="", seq=TOKENS_PER_BATCH,
                         batch=1, size=hidden, pass_=pass_name, ms=round(ms, 4),
                         throughput=round(moved / ms / 1e6, 1), unit="GB/s")
                )  # fmt: skip
    return rows


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

    panels = [(c, p) for c in (False, True) for p in ("forward", "backward", "forward+backward")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True)
    for ax, (causal, pass_name) in zip(axes.flat, panels, strict=True):
        for provider in sorted({r["provider"] for r in rows if r["kernel"] == "attention"}):
            points = [
                (r["seq"], r["throughput"])
                for r in rows
                if r["kernel"] == "attention"
                and r["provider"] == provider
                and r["causal"] == causal
                and r["pass_"] == pass_name
            ]
            ax.plot(*zip(*points, strict=True), marker="o", label=provider)
        ax.set(title=f"{pass_name}, {'causal' if causal else 'full'}", xscale="log",
               xlabel="sequence length", ylabel="TFLOP/s")  # fmt: skip
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "kernels.png", dpi=120)
    print(f"wrote {out_dir / 'kernels.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--kv-heads", type=int, default=QUERY_HEADS, help="fewer means GQA")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: the kernel benchmark measures GPU throughput; nothing to do")
        return 0
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, head dim {HEAD_DIM}")
    rows = bench_attention(dtype, args.kv_heads) + bench_rmsnorm(dtype)
    save(rows, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
