"""A model family defined outside the engine, with a pipeline message of its own: the toy
"mixer" (``--model-provider tests.training.toy_provider:TOY``).

Not a transformer: token embedding, then residual MLP layers that mix tokens by a causal shift
and carry a per-sequence context vector ``[b, c]`` (``c = hidden / 4``) alongside the hidden
states ``[s, b, h]``; the context is read off the first token, so every position sees only
itself, its predecessor (through the shift, layer by layer) and the first token. Pipeline
stages therefore pass two tensors, ``(hidden [s, b, h], context [b, c])``, which the chunk
declares with ``pipeline_message`` (`engine.pipeline_parallel.p2p`). Built from the engine's
tensor-parallel layers; every parameter is declared in its inventory and initialised from a
generator seeded by its canonical name, so any layout builds the same model.

Each layer ``n``::

    y = rms(x + shift(x) / 2 + context_in(c))       # shift: the previous token's state
    x = x + fc2(gelu(fc1(y)))                       # fc1 column-, fc2 row-parallel
    c = c + tanh(context_out(x[0]))                 # the first token's state
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import parallel_state
from engine.models.config import ModelConfig
from engine.models.families import ModelFamily
from engine.models.init import seeded_init
from engine.models.inventory import CanonicalTensor, Inventory, ParameterSpec, Stage
from engine.models.stage import chunk_layer_numbers
from engine.models.weights import check_built_as_declared
from engine.tensor_parallel import (
    ColumnParallelLinear,
    InitMethod,
    RowParallelLinear,
    VocabParallelEmbedding,
    pad_vocab_size,
    vocab_padded_init,
    vocab_parallel_cross_entropy,
)

NAME = "toy-mixer"


def context_size(config: ModelConfig) -> int:
    """The width ``c`` of the context vector every stage passes on."""
    return max(config.hidden_size // 4, 1)


def toy_inventory(config: ModelConfig, tp_size: int) -> Inventory:
    """Every parameter of the toy mixer over ``tp_size`` TP ranks (no HF names: it has no
    HuggingFace counterpart)."""
    h, ffn, c, vocab = (
        config.hidden_size,
        config.ffn_hidden_size,
        context_size(config),
        config.vocab_size,
    )
    padded = pad_vocab_size(vocab, tp_size, config.make_vocab_size_divisible_by)

    def replicated(name: str, shape: tuple[int, int], stage: Stage = "layer") -> ParameterSpec:
        return ParameterSpec(name, (CanonicalTensor(name, shape),), shape, None, stage=stage)

    def vocabulary(name: str, stage: Stage) -> ParameterSpec:
        return ParameterSpec(name, (CanonicalTensor(name, (vocab, h)),), (padded, h), 0,
                             (padded,), stage=stage, vocab_padded=True)  # fmt: skip

    fc1, fc2 = "layers.{n}.fc1.weight", "layers.{n}.fc2.weight"
    specs = (
        vocabulary("embedding.weight", "first"),
        replicated("context_init.weight", (c, h), "first"),
        replicated("layers.{n}.context_in.weight", (h, c)),
        ParameterSpec(fc1, (CanonicalTensor(fc1, (ffn, h)),), (ffn, h), 0, (ffn,)),
        ParameterSpec(fc2, (CanonicalTensor(fc2, (h, ffn)),), (h, ffn), 1, (ffn,)),
        replicated("layers.{n}.context_out.weight", (c, h)),
        replicated("final_context.weight", (h, c), "last"),
        vocabulary("output_layer.weight", "last"),
    )
    return Inventory(specs, config.num_layers, tp_size)


def _init(config: ModelConfig, name: str, std: float | None = None) -> InitMethod:
    """The engine's layout-free init, seeded by the family and the canonical name."""
    return seeded_init(config, f"{NAME}:{name}", std)


class Replicated(nn.Module):
    """A weight every TP rank holds whole (``F.linear`` by it): the context projections."""

    def __init__(self, config: ModelConfig, name: str, out_features: int, in_features: int):
        super().__init__()
        weight = torch.empty(out_features, in_features, dtype=config.params_dtype)
        _init(config, name, 0.1)(weight)
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMS normalisation over the last dimension."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class MixerLayer(nn.Module):
    """One residual mixer layer (see the module docstring)."""

    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        self.layer_number, self.eps = layer_number, config.norm_epsilon
        h, ffn, c = config.hidden_size, config.ffn_hidden_size, context_size(config)
        prefix = f"layers.{layer_number}"
        self.context_in = Replicated(config, f"{prefix}.context_in", h, c)
        self.fc1 = ColumnParallelLinear(h, ffn, init_method=_init(config, f"{prefix}.fc1"),
                                        dtype=config.params_dtype)  # fmt: skip
        output_std = config.init_method_std / (2.0 * config.num_layers) ** 0.5
        self.fc2 = RowParallelLinear(ffn, h, init_method=_init(config, f"{prefix}.fc2", output_std),
                                     dtype=config.params_dtype)  # fmt: skip
        self.context_out = Replicated(config, f"{prefix}.context_out", c, h)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shifted = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
        y = _rms(x + 0.5 * shifted + self.context_in(c).unsqueeze(0), self.eps)
        x = x + self.fc2(F.gelu(self.fc1(y)))
        return x, c + torch.tanh(self.context_out(x[0]))


class ToyMixer(nn.Module):
    """One chunk of the toy mixer: this rank's pipeline stage, sharded over TP (the contract
    of `engine.models.chunk.ModelChunk`, plus ``pipeline_message``)."""

    def __init__(
        self,
        config: ModelConfig,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        layer_numbers: list[int] | None = None,
    ):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if config.sequence_parallel or config.tie_word_embeddings:
            raise ValueError(f"model family {NAME!r} supports neither --sequence-parallel nor "
                             "tied embeddings")  # fmt: skip
        if config.ffn_hidden_size % tp != 0:
            raise ValueError(
                f"--ffn-hidden-size ({config.ffn_hidden_size}) must be divisible by "
                f"--tensor-model-parallel-size ({tp})"
            )
        self.config = config
        self.pre_process = (
            parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process
        )
        self.post_process = (
            parallel_state.is_pipeline_last_stage() if post_process is None else post_process
        )
        if layer_numbers is None:
            layer_numbers = chunk_layer_numbers(config)
        self.inventory = config.inventory(tp)
        self.input_tensor: tuple[torch.Tensor, torch.Tensor] | None = None
        h, c = config.hidden_size, context_size(config)
        if self.pre_process:
            self.embedding = VocabParallelEmbedding(
                config.vocab_size, h, init_method=_init(config, "embedding"),
                make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
                dtype=config.params_dtype,
            )  # fmt: skip
            self.context_init = Replicated(config, "context_init", c, h)
        self.layers = nn.ModuleList(MixerLayer(config, n) for n in layer_numbers)
        if self.post_process:
            self.final_context = Replicated(config, "final_context", h, c)
            padded = pad_vocab_size(config.vocab_size, tp, config.make_vocab_size_divisible_by)
            self.output_layer = ColumnParallelLinear(
                h, padded, dtype=config.params_dtype,
                init_method=vocab_padded_init(_init(config, "output"), config.vocab_size),
            )  # fmt: skip
        check_built_as_declared(self, layer_numbers, self.pre_process, self.post_process)

    def pipeline_message(
        self, seq_length: int, micro_batch_size: int
    ) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """What every stage sends the next: hidden states ``[s, b, h]`` and the context
        ``[b, c]``, in the parameters' dtype."""
        dtype = next(self.parameters()).dtype
        return [
            ((seq_length, micro_batch_size, self.config.hidden_size), dtype),
            ((micro_batch_size, context_size(self.config)), dtype),
        ]

    def set_input_tensor(self, input_tensor: Any) -> None:
        """The previous stage's ``(hidden, context)``, for the next forward."""
        self.input_tensor = input_tensor

    def shared_embedding_or_output_weight(self) -> nn.Parameter | None:
        return None  # never tied

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: Any = None,
    ) -> Any:
        """``[b, s]`` ids in on the first stage, ``(hidden [s, b, h], context [b, c])`` from
        the previous one elsewhere (``decoder_input`` or `set_input_tensor`'s); out: per-token
        loss ``[b, s]`` with ``labels`` or logits ``[b, s, V/tp]`` on the last stage, the
        ``(hidden, context)`` pair elsewhere. Positions are implicit (the shift)."""
        if kv_cache is not None:
            raise NotImplementedError(f"model family {NAME!r} has no KV cache")
        if decoder_input is None:
            decoder_input = self.input_tensor
        if self.pre_process:
            if input_ids is None:
                raise ValueError("this pipeline stage holds the embedding: pass input_ids")
            x = self.embedding(input_ids).transpose(0, 1).contiguous()  # [s, b, h]
            c = torch.tanh(self.context_init(x[0]))
        elif decoder_input is None:
            raise ValueError("this pipeline stage has no embedding: pass decoder_input")
        else:
            x, c = decoder_input
        for layer in self.layers:
            x, c = layer(x, c)
        if not self.post_process:
            return x, c
        x = _rms(x + self.final_context(c).unsqueeze(0), self.config.norm_epsilon)
        logits = self.output_layer(x)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1)
        return vocab_parallel_cross_entropy(logits, labels.t(), self.config.vocab_size).t()


def toy_flops_per_token(config: ModelConfig, seq_length: int) -> int:
    """Forward and backward: 6 FLOPs per parameter per token (no attention)."""
    return 6 * config.num_parameters()


TOY = ModelFamily(
    name=NAME,
    model=ToyMixer,
    inventory=toy_inventory,
    architecture_flags={
        "num_layers": "--num-layers",
        "hidden_size": "--hidden-size",
        "ffn_hidden_size": "--ffn-hidden-size",
        "vocab_size": "--vocab-size (the tokenizer's)",
    },
    flops_per_token=toy_flops_per_token,
    unused_config_fields=(
        "num_query_groups",
        "rotary_base",
        "attention_dropout",
        "sequence_parallel",
        "recompute_granularity",
        "attention_backend",
        "norm_backend",
    ),  # fmt: skip
)
"""The family, for ``--model-provider tests.training.toy_provider:TOY`` or
``pretrain(job, model_provider=TOY)``."""
