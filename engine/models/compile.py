"""``--compile``: torch.compile applied to each decoder layer in place, as torchtitan does.

Compiling block by block instead of the whole chunk keeps what happens between the layers
(the pipeline's sends and receives, full recomputation's checkpoint around each layer, DDP's
gradient hooks, FSDP2's per-layer gathers) in eager PyTorch. The layers of a chunk share one
code object and the same shapes, so the compiler traces one graph and reuses it for every
layer. ``nn.Module.compile`` keeps the module objects, so parameter names, state dicts and
checkpoints are unchanged.

Compilation happens on first use (the first forward and backward). `compile_seconds` reads how
long it took from torch's own compile metrics, and the trainer reports that once in the log.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# torch._dynamo's per-phase timings (seconds) that together make up compiling: tracing and
# the forward graph, then the backward graph, which is compiled at the first backward.
_COMPILE_PHASES = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def compile_layers(chunks: Iterable[nn.Module]) -> int:
    """Compile every decoder layer (``chunk.layers``, the model contract's ModuleList) of
    ``chunks`` in place; returns how many layers were compiled."""
    count = 0
    for chunk in chunks:
        layers = getattr(chunk, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(
                f"--compile compiles a chunk's decoder layers (`layers`, an nn.ModuleList): "
                f"{type(chunk).__name__} has none"
            )
        for layer in layers:
            layer.compile()
        count += len(layers)
    return count


def compile_seconds() -> float | None:
    """Seconds this process has spent compiling so far, by torch's compile metrics (None
    when this torch version records none under the names read here)."""
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    phases = [sum(metrics[name]) for name in _COMPILE_PHASES if name in metrics]
    return sum(phases) if phases else None


def compile_report(chunks: Iterable[nn.Module]) -> str:
    """The log line after the first compiled iteration: layers compiled here and the time."""
    layers = sum(len(getattr(chunk, "layers", ())) for chunk in chunks)
    seconds = compile_seconds()
    took = "" if seconds is None else f" in {seconds:.1f} s"
    return f"--compile: {layers} decoder layers compiled{took} (this rank, first iteration)"
