"""This rank's model chunks, built for the current parallel state: initialised (a run from
scratch) or uninitialised, for a checkpoint to fill.

Initialising is paid for nothing when a checkpoint is loaded right after: the layout-free init
(`engine.models.init`) draws every full weight to keep this rank's slice, which for a 7B model
is seconds per rank and the whole model's size in host memory at a time. `build_uninitialised`
builds under the meta device (no init method runs, nothing is allocated), then gives every
parameter storage on the target device, uninitialised; `engine.checkpointing.load_checkpoint`
fills every one of them or fails naming the missing tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from engine import parallel_state
from engine.models.chunk import check_model_chunk
from engine.models.config import ModelConfig
from engine.models.families import family_of
from engine.models.stage import chunk_layer_numbers
from engine.tensor_parallel.layers import initialisation_scratch

M = TypeVar("M", bound=nn.Module)

RESET_BUFFERS = "reset_buffers"
"""The method a module holding buffers defines for `materialise`: it recomputes them in place
(a checkpoint holds parameters only)."""


def build_model_chunks(
    config: ModelConfig, *, initialise: bool = True, device: torch.device | str | None = None
) -> list[nn.Module]:
    """This rank's model chunks (built by ``config``'s family), one per virtual stage (a list
    of one without interleaving), in chunk order.

    Sets the virtual pipeline rank while building each chunk, so that chunk 0 of the first
    rank gets the embedding and the last chunk of the last rank the output head, and leaves it
    at 0.

    Args:
        initialise: draw every weight (the layout-free init) on ``device``: on the CPU into
            one reused buffer (`initialisation_scratch`), on a GPU there with the GPU's
            generator; False: build on the meta device and `materialise` on ``device``,
            uninitialised, for a checkpoint to fill (no init method runs).
        device: where the chunks are allocated (default: the CPU).
    """
    build = family_of(config).model
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    # Initialised chunks are built where they will run: a layer built on a GPU draws its full
    # weights there (`engine.tensor_parallel.layers.initialise_shard`), not on the host.
    where = torch.device("meta") if not initialise else torch.device(device or "cpu")
    with where, initialisation_scratch() if initialise else contextlib.nullcontext():
        for chunk in range(v or 1):
            if v is not None:
                parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)
            chunks.append(build(config, layer_numbers=chunk_layer_numbers(config)))
            check_model_chunk(chunks[-1])
    if v is not None:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    if not initialise:
        chunks = [materialise(chunk, device) for chunk in chunks]
    return chunks


def build_uninitialised(build: Callable[[], M], device: torch.device | str | None = None) -> M:
    """``build()`` under the meta device, then `materialise`\\ d on ``device`` (default: the
    CPU): every parameter has storage but holds garbage until a checkpoint is loaded into it."""
    with torch.device("meta"):
        module = build()
    return materialise(module, device)


def materialise(module: M, device: torch.device | str | None = None) -> M:
    """Give every meta parameter and buffer of ``module`` uninitialised storage on ``device``
    (default: the CPU), in place, then let each module that holds buffers recompute them
    (its `RESET_BUFFERS` method).

    Unlike ``nn.Module.to_empty``, a parameter keeps its attributes (the tensor-parallel ones
    that gradient reduction and checkpoints read) and stays shared where it was (one new
    parameter per old one).

    Raises:
        ValueError: a module holds buffers but has no `RESET_BUFFERS` method (no checkpoint
            would fill them), naming it; raised before anything is allocated.
    """
    device = torch.device("cpu" if device is None else device)
    for name, sub in module.named_modules():
        if sub._buffers and not callable(getattr(sub, RESET_BUFFERS, None)):
            raise ValueError(
                f"cannot build {type(module).__name__} uninitialised: its module "
                f"{name or '(root)'!r} ({type(sub).__name__}) holds the buffers "
                f"{', '.join(sub._buffers)}, which no checkpoint fills; give "
                f"{type(sub).__name__} a {RESET_BUFFERS}() method that recomputes them"
            )
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in made:
                new = nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=param.requires_grad
                )
                new.__dict__.update(param.__dict__)  # tensor_model_parallel, partition_dim...
                made[id(param)] = new
            sub._parameters[name] = made[id(param)]
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.device.type == "meta":
                sub._buffers[name] = torch.empty_like(buffer, device=device)
    for sub in module.modules():
        if sub._buffers:
            getattr(sub, RESET_BUFFERS)()
    return module
