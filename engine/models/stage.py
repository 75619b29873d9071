"""Which layers this rank's current model chunk holds, from the parallel state, and the
pipeline plumbing every model chunk shares (`PipelineStage`)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from engine import parallel_state
from engine.models.config import ModelConfig
from engine.tensor_parallel import (
    InitMethod,
    pad_vocab_size,
    vocab_padded_init,
    vocab_parallel_cross_entropy,
)
from engine.tensor_parallel.linear_cross_entropy import (
    VocabParallelOutputLayer,
    default_chunk_size,
)


def chunk_layer_numbers(config: ModelConfig, virtual_rank: int | None = None) -> list[int]:
    """The layers of this rank's current model chunk (layout read from `parallel_state`, the
    uneven split, if any, from ``config``).

    ``virtual_rank`` defaults to the virtual pipeline rank set in `parallel_state` (0 without
    interleaving).
    """
    p = parallel_state.get_pipeline_model_parallel_world_size()
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if virtual_rank is None:
        virtual_rank = parallel_state.get_virtual_pipeline_model_parallel_rank() or 0
    stages = config.virtual_stage_layers(p, v)
    return stages[virtual_rank * p + parallel_state.get_pipeline_model_parallel_rank()]


class PipelineStage(nn.Module):
    """The pipeline plumbing every model chunk shares, whatever its layers (subclass it and
    build the layers in ``__init__`` after calling it): which stage it is (``pre_process``:
    it holds ``embedding``; ``post_process``: it holds ``output_layer``), which layers it
    holds (``layer_numbers``), its parameter inventory at this TP size, the input the schedule
    hands a later stage, and the tied weight shared between the first and last stage.

    Args:
        config: the architecture.
        pre_process / post_process: default: the first / last pipeline stage.
        layer_numbers: global indices of the layers to build (default: this rank's chunk).
    """

    def __init__(
        self,
        config: ModelConfig,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        layer_numbers: list[int] | None = None,
    ):
        super().__init__()
        self.config = config
        self.pre_process = (
            parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process
        )
        self.post_process = (
            parallel_state.is_pipeline_last_stage() if post_process is None else post_process
        )
        self.layer_numbers = (
            chunk_layer_numbers(config) if layer_numbers is None else list(layer_numbers)
        )
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.inventory = config.inventory(self.tp)
        # Stages after the first get their input from the schedule (Megatron's
        # set_input_tensor), so a forward-step function calls every stage the same way.
        self.input_tensor: Any = None

    def set_input_tensor(self, input_tensor: Any) -> None:
        """The previous stage's output (``[s(/tp), b, h]``, or the declared message) for the
        next forward."""
        self.input_tensor = input_tensor

    def build_output_layer(self, init_method: InitMethod) -> None:
        """The vocabulary-parallel output head ``output_layer`` (``[V_padded/tp, h]``, padding
        rows zero) of the last stage. A tied head on the first stage uses the embedding's
        weight itself; off it the head keeps its own copy (``init_method`` should then be
        the embedding's, and the pipeline keeps the two in sync)."""
        config = self.config
        padded = pad_vocab_size(config.vocab_size, self.tp, config.make_vocab_size_divisible_by)
        self.padded_vocab_size = padded
        self.output_layer = VocabParallelOutputLayer(
            config.hidden_size, padded, sequence_parallel=config.sequence_parallel,
            dtype=config.params_dtype,
            init_method=vocab_padded_init(init_method, config.vocab_size),
        )  # fmt: skip
        if config.tie_word_embeddings and self.pre_process:
            del self.output_layer.weight  # use the embedding's weight itself

    def head(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The final hidden states ``[s(/tp), b, h]`` through the output head: per-token loss
        ``[b, s]`` (float32) with ``labels [b, s]``, else logits ``[b, s, V_padded/tp]``.

        The loss is computed ``config.cross_entropy_chunk_size`` tokens at a time (by default
        `default_chunk_size`'s) and the whole logits never exist (`linear_cross_entropy`); a
        chunk size of 0 takes the whole logits. Labels of `IGNORE_INDEX` have loss 0."""
        tied = self.config.tie_word_embeddings and self.pre_process
        weight = cast(Any, self).embedding.weight if tied else None
        chunk = self.config.cross_entropy_chunk_size
        if labels is not None and chunk is None:
            chunk = default_chunk_size(labels.numel(), self.config.hidden_size,
                                       self.padded_vocab_size // self.tp)  # fmt: skip
        if labels is not None and chunk:
            losses = self.output_layer(x, weight, labels.t(), self.config.vocab_size, chunk)
            return losses.t().contiguous()
        logits = self.output_layer(x, weight=weight)
        if labels is None:
            return logits.transpose(0, 1)
        # Cross entropy on [s, b] avoids transposing the (large) logits. The [b, s] losses are
        # returned contiguous: a transposed view out of an FSDP2 root draws its warning.
        losses = vocab_parallel_cross_entropy(logits, labels.t(), self.config.vocab_size)
        return losses.t().contiguous()

    def shared_embedding_or_output_weight(self) -> nn.Parameter | None:
        """The weight a tied embedding shares between the first and last stage, if any here."""
        if not self.config.tie_word_embeddings:
            return None
        module = cast(Any, self)
        if self.pre_process:
            return module.embedding.weight
        return module.output_layer.weight if self.post_process else None
