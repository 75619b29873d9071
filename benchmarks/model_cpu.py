"""Forward+backward speed of our LlamaModel against transformers' LlamaForCausalLM, and against
this machine's own GEMM throughput.

Same config, same weights (copied through the canonical view), same tokens, one process. Per
shape, every repeat runs one step of each side in turn (ours eager, transformers eager, ours
compiled, transformers compiled) and then the GEMM probe, so all of them see the same machine
state; figures are medians over the repeats. "compiled" is torch.compile per decoder layer
(`engine.models.compile.compile_layers` for ours, ``layer.compile()`` on each of transformers'
decoder layers: like for like).

Achieved GFLOP/s counts the engine's training FLOPs per token, the numerator of the trainer's
MFU (`engine.models.flops.flops_per_token`: ``6·N + 12·L·h·s``, N the matmul weights, the second
term attention's two matmuls), times the step's tokens, over the median step time. The ceiling
is the best float32 ``torch.mm`` GFLOP/s measured in the same run with the same threads, at the
model's own largest matmul shapes (gate|up ``[b·s, h] x [h, 2·ffn]``, the output layer
``[b·s, h] x [h, V]``) and a 2048-square one. One line per shape and mode::

    shape=compute mode=compiled tokens_per_s=... hf_tokens_per_s=... gflops=... hf_gflops=...
    gemm_ceiling_gflops=... ratio_vs_hf=X.XX fraction_of_gemm_ceiling=X.XX

The shapes: "default" (4 layers, h=256, seq 256, batch 4: the output layer dominates) and
"compute" (4 layers, h=1024, seq 512, batch 2: the decoder layers' GEMMs dominate); the size
flags override both.

    python benchmarks/model_cpu.py [--shape both --mode both --repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import transformers

from engine import parallel_state
from engine.device import init_distributed
from engine.models import LlamaModel, ModelConfig
from engine.models.compile import compile_layers
from engine.models.flops import flops_per_token
from engine.models.llama.hf import canonical_from_hf, hf_config_kwargs
from engine.models.weights import load_full_state

SQUARE_GEMM = 2048
"""The side of the square GEMM the probe times besides the model's own shapes."""


@dataclass(frozen=True)
class Shape:
    """A benchmarked model size and batch."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int


SHAPES = {
    "default": Shape(layers=4, hidden=256, heads=8, kv_heads=4, vocab=32000, seq=256, batch=4),
    "compute": Shape(layers=4, hidden=1024, heads=16, kv_heads=8, vocab=32000, seq=512, batch=2),
}
MODES = ("eager", "compiled")


def _seconds(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _config(shape: Shape) -> ModelConfig:
    return ModelConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads, ffn_hidden_size=int(shape.hidden * 8 / 3 // 64 * 64),
        vocab_size=shape.vocab, max_position_embeddings=shape.seq,
    )  # fmt: skip


def _gemm_probe(shape: Shape, config: ModelConfig) -> tuple[list[Callable[[], object]], list[int]]:
    """One ``torch.mm`` step per probed shape (float32) and its FLOPs."""
    tokens = shape.batch * shape.seq
    sizes = [
        (tokens, config.hidden_size, 2 * config.ffn_hidden_size),  # gate|up
        (tokens, config.hidden_size, config.vocab_size),  # the output layer
        (SQUARE_GEMM, SQUARE_GEMM, SQUARE_GEMM),
    ]
    steps: list[Callable[[], object]] = []
    flops: list[int] = []
    for m, k, n in sizes:
        a, b = torch.randn(m, k), torch.randn(k, n)  # [m, k] x [k, n]
        steps.append(functools.partial(torch.mm, a, b, out=torch.empty(m, n)))
        flops.append(2 * m * k * n)
    return steps, flops


def measure(name: str, shape: Shape, modes: tuple[str, ...], repeats: int) -> list[str]:
    """The benchmark's lines for ``shape`` (named ``name``), one per mode."""
    config = _config(shape)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**hf_config_kwargs(config))
    weights = transformers.LlamaForCausalLM(hf_config).state_dict()

    def build() -> tuple[LlamaModel, transformers.LlamaForCausalLM]:
        """Ours and transformers' model, with the same weights: one pair per mode (the
        compiled mode compiles its pair in place)."""
        hf = transformers.LlamaForCausalLM(hf_config)
        hf.load_state_dict(weights)
        ours = LlamaModel(config)
        load_full_state(ours, canonical_from_hf(weights, config))
        return ours, hf

    tokens = torch.randint(0, config.vocab_size, (shape.batch, shape.seq + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def our_step(model: LlamaModel) -> Callable[[], None]:
        def step() -> None:
            model(inputs, labels=labels).mean().backward()
            model.zero_grad(set_to_none=True)

        return step

    def hf_step(model: transformers.LlamaForCausalLM) -> Callable[[], None]:
        def step() -> None:
            # HF shifts labels itself: pass the unshifted sequence.
            model(tokens, labels=tokens).loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    sides: dict[str, Callable[[], None]] = {}
    for mode in modes:
        ours, hf = build()
        if mode == "compiled":
            compile_layers([ours])
            for layer in hf.model.layers:
                layer.compile()
        sides[f"ours {mode}"], sides[f"hf {mode}"] = our_step(ours), hf_step(hf)
    gemms, gemm_flops = _gemm_probe(shape, config)

    for step in (*sides.values(), *gemms):  # warm-up (and compilation)
        step()
    times: dict[str, list[float]] = {side: [] for side in sides}
    gemm_times: list[list[float]] = [[] for _ in gemms]
    for _ in range(repeats):  # round robin: every side sees the same machine state
        for side, step in sides.items():
            times[side].append(_seconds(step))
        for probe, step in zip(gemm_times, gemms, strict=True):
            probe.append(_seconds(step))
    ceiling = max(f / min(t) for f, t in zip(gemm_flops, gemm_times, strict=True)) / 1e9

    step_tokens = shape.batch * shape.seq
    step_gflop = flops_per_token(config, shape.seq) * step_tokens / 1e9
    lines = []
    for mode in modes:
        ours_s = statistics.median(times[f"ours {mode}"])
        hf_s = statistics.median(times[f"hf {mode}"])
        lines.append(
            f"shape={name} mode={mode} tokens_per_s={step_tokens / ours_s:.0f} "
            f"hf_tokens_per_s={step_tokens / hf_s:.0f} gflops={step_gflop / ours_s:.2f} "
            f"hf_gflops={step_gflop / hf_s:.2f} gemm_ceiling_gflops={ceiling:.1f} "
            f"ratio_vs_hf={hf_s / ours_s:.2f} "
            f"fraction_of_gemm_ceiling={step_gflop / ours_s / ceiling:.2f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=(*SHAPES, "both"), default="both",
                        help="which preset shape(s) to run (default: both)")  # fmt: skip
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both",
                        help="eager, compiled (torch.compile per layer) or both")  # fmt: skip
    for field in ("layers", "hidden", "heads", "kv_heads", "vocab", "seq", "batch"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                            help=f"override the shapes' {field}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    init_distributed()
    parallel_state.initialize_model_parallel()
    names = tuple(SHAPES) if args.shape == "both" else (args.shape,)
    modes = MODES if args.mode == "both" else (args.mode,)
    overrides = {
        field: getattr(args, field)
        for field in Shape.__dataclass_fields__
        if getattr(args, field) is not None
    }
    for name in names:
        shape = replace(SHAPES[name], **overrides)
        print(
            f"config {name}: {shape.layers} layers, h={shape.hidden}, "
            f"heads={shape.heads}/{shape.kv_heads}, vocab={shape.vocab}, "
            f"batch={shape.batch} x seq={shape.seq}, threads={torch.get_num_threads()}, "
            f"float32, median of {args.repeats}",
            flush=True,
        )
        for line in measure(name, shape, modes, args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
