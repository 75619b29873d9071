"""The model contract: what the engine reads from a model chunk, written down once.

A model chunk is one pipeline stage's share of a model (all of it without pipelining),
sharded over TP, built by its family's ``model(config, pre_process=None, post_process=None,
layer_numbers=None)``. `ModelChunk` states what such a chunk exposes; `check_model_chunk`
verifies it when the engine builds one, so a model that lacks a piece is refused with the
piece named instead of failing later inside a schedule or a checkpoint. The helpers below
are how the rest of the engine reads those pieces. docs/custom_models.md walks through it.
"""

from __future__ import annotations

from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

from engine.models.config import ModelConfig
from engine.models.inventory import Inventory


@runtime_checkable
class ModelChunk(Protocol):
    """What a model stage exposes to the engine (see the module docstring)."""

    config: ModelConfig
    """Its configuration; the engine reads ``hidden_size``, ``sequence_parallel``,
    ``params_dtype`` (pipeline messages ``[s(/tp), b, h]``, unless the chunk declares its own
    with an optional ``pipeline_message(seq_length, micro_batch_size)`` returning the
    ``(shape, dtype)`` of every tensor it sends: see `engine.pipeline_parallel.p2p`),
    ``vocab_size`` and ``max_position_embeddings`` (decoding), ``family`` (checkpoints)."""
    inventory: Inventory
    """Every parameter it may hold, declared once (`engine.models.inventory`)."""
    pre_process: bool
    """It holds the input embedding (the first stage): it reads ``input_ids``."""
    post_process: bool
    """It holds the output head (the last stage): it returns the loss or the logits."""
    layers: nn.ModuleList
    """Its decoder layers, each with a global ``layer_number``."""

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """The previous stage's output, for the next forward (Megatron's convention)."""

    def shared_embedding_or_output_weight(self) -> nn.Parameter | None:
        """The weight a tied embedding shares between the first and last stage, if any
        here (its gradients are summed over the two stages)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        kv_cache: Any = None,
    ) -> torch.Tensor:
        """``[b, s]`` ids (first stage) or ``decoder_input [s(/tp), b, h]`` in; per-token loss
        ``[b, s]`` (with ``labels``) or logits ``[b, s, V/tp]`` out on the last stage, hidden
        states ``[s(/tp), b, h]`` elsewhere; a ``kv_cache`` (`engine.models.kv_cache`) when
        decoding. Packed-document training (SFT, ``--reset-attention-mask``) also passes
        ``document_ids=[b, s]`` (the whole sequence's under context parallelism), which a
        model that trains on such data accepts and keeps attention within."""


_ATTRIBUTES = ("config", "inventory", "pre_process", "post_process", "layers")
_METHODS = ("set_input_tensor", "shared_embedding_or_output_weight", "forward")


def check_model_chunk(module: nn.Module) -> None:
    """Raise TypeError naming every piece of `ModelChunk` that ``module`` lacks."""
    missing = [name for name in _ATTRIBUTES if not hasattr(module, name)]
    missing += [f"{name}()" for name in _METHODS if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(
            f"{type(module).__name__} is not a model chunk: it lacks {', '.join(missing)} "
            "(see engine.models.chunk.ModelChunk and docs/custom_models.md)"
        )
    config_of(module)
    inventory_of(module)
    layer_numbers(module)


def config_of(module: nn.Module) -> ModelConfig:
    """The chunk's `ModelConfig` (``module.config``)."""
    config = getattr(module, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"{type(module).__name__} is not a model chunk: it has no ModelConfig")
    return config


def inventory_of(module: nn.Module) -> Inventory:
    """The chunk's parameter inventory (``module.inventory``)."""
    inventory = getattr(module, "inventory", None)
    if not isinstance(inventory, Inventory):
        raise TypeError(f"{type(module).__name__} is not a model chunk: it has no inventory")
    return inventory


def layer_numbers(module: nn.Module) -> list[int]:
    """The global layer number of each of the chunk's ``layers``, in order."""
    layers = getattr(module, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(module).__name__} is not a model chunk: it has no layers")
    return [int(cast(Any, layer).layer_number) for layer in layers]
