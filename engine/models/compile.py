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

from engine.models.stage import PipelineStage

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


def compile_loss_head(chunks: Iterable[nn.Module]) -> None:
    """Compile the output head and loss (`PipelineStage.head`) of the chunks that hold it.
    The head must take the whole logits (``cross_entropy_chunk_size=0``): the chunked head
    computes its gradients in the forward with data-dependent checks, which break the graph,
    whereas the compiler fuses the whole logits' log-softmax with the cross entropy itself."""
    for chunk in chunks:
        if not getattr(chunk, "post_process", False):
            continue
        if not isinstance(chunk, PipelineStage):
            raise TypeError(
                f"--compile-loss-head compiles PipelineStage.head: {type(chunk).__name__} is not "
                "a PipelineStage"
            )
        if chunk.config.cross_entropy_chunk_size != 0:
            raise ValueError("--compile-loss-head needs the whole-logits head (chunk size 0)")
        chunk.head = torch.compile(chunk.head)  # type: ignore[method-assign]


def compile_seconds() -> float | None:
    """Seconds this process has spent compiling so far, by torch's compile metrics (None
    when this torch version records none under the names read here)."""
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    phases = [sum(metrics[name]) for name in _COMPILE_PHASES if name in metrics]
    return sum(phases) if phases else None


def compile_report(chunks: Iterable[nn.Module]) -> str:
    """The log line after the first compiled iteration: what was compiled here and the time."""
    chunks = list(chunks)
    layers = sum(
        getattr(layer, "_compiled_call_impl", None) is not None
        for chunk in chunks
        for layer in getattr(chunk, "layers", ())
    )
    parts = [f"{layers} decoder layers"] if layers else []
    if any("head" in vars(chunk) for chunk in chunks):  # compile_loss_head's instance attribute
        parts.append("the loss head")
    seconds = compile_seconds()
    took = "" if seconds is None else f" in {seconds:.1f} s"
    what = " and ".join(parts) or "nothing"
    return f"--compile: {what} compiled{took} (this rank, first iteration)"
