"""GPT-2 (HF ``GPT2LMHeadModel``'s architecture) built from the engine's parallel layers.

Learned position embeddings, pre-LayerNorm blocks with biases, fused Q|K|V, a ``gelu_new``
(tanh) MLP, a final LayerNorm and a head tied to the token embedding. The parallel policy is
Megatron's: Q|K|V and fc column-parallel, the attention and MLP output projections
row-parallel, the vocabulary split over TP in the embedding and the head; with sequence
parallelism the LayerNorms, residuals and row-parallel biases see ``[s/tp, b, h]`` (their
gradients are partial over TP, as `examples.gpt2.inventory` declares). Activations are
sequence-first ``[s, b, h]`` inside the decoder; the interface is `LlamaModel`'s.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine import parallel_state
from engine.models.backends import ATTENTION_BACKENDS, resolve_backend
from engine.models.config import ModelConfig
from engine.models.init import output_std, seeded_init
from engine.models.kv_cache import KVCache
from engine.models.stage import PipelineStage
from engine.models.weights import check_built_as_declared
from engine.parallel_state import ParallelConfig
from engine.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from engine.tensor_parallel.attributes import mark_partial_over_tp
from engine.tensor_parallel.layers import initialise_shard
from engine.tensor_parallel.random import MODEL_PARALLEL_RNG_NAME, checkpoint, get_rng_tracker


def _tp() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def _column(config: ModelConfig, name: str, sizes: list[int]) -> ColumnParallelLinear:
    """A column-parallel projection with bias from ``h`` (``sizes``: its fused blocks)."""
    init = seeded_init(config, name)
    return ColumnParallelLinear(config.hidden_size, sizes, init_method=init, **_kwargs(config))


def _row(config: ModelConfig, name: str, inputs: int) -> RowParallelLinear:
    """A row-parallel projection with bias into the residual stream."""
    init = seeded_init(config, name, output_std(config))
    return RowParallelLinear(inputs, config.hidden_size, init_method=init, **_kwargs(config))


def _kwargs(config: ModelConfig) -> dict[str, Any]:
    return dict(bias=True, sequence_parallel=config.sequence_parallel, dtype=config.params_dtype)


def _layer_norm(config: ModelConfig) -> nn.LayerNorm:
    norm = nn.LayerNorm(config.hidden_size, config.norm_epsilon, dtype=config.params_dtype)
    for param in (norm.weight, norm.bias):
        mark_partial_over_tp(param, config.sequence_parallel)  # each rank sees s/tp tokens
    return norm


class Attention(nn.Module):
    """Causal multi-head attention: column-parallel Q|K|V (whole heads per rank),
    row-parallel output projection."""

    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        self.layer_number = layer_number
        self.local_kv_heads = heads // _tp()  # what `KVCache` allocates
        self.head_dim = h // heads
        self.dropout = config.attention_dropout
        self.recompute_core = config.recompute_granularity == "selective"
        self.attention_fn = ATTENTION_BACKENDS[resolve_backend(config.attention_backend)]
        self.qkv = _column(config, f"layers.{layer_number}.attention.qkv", [h, h, h])
        self.out = _row(config, f"layers.{layer_number}.attention.out", h)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """x ``[s(/tp), b, h]`` -> ``[s(/tp), b, h]``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        s, b = q.shape[:2]
        q, k, v = (t.view(s, b, self.local_kv_heads, self.head_dim) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)
            return self.out(self._core(q, k, v, kv_cache.attention_mask))
        return self.out(
            checkpoint(self._core, q, k, v) if self.recompute_core else self._core(q, k, v)
        )

    def _core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q/k/v ``[s, b, heads/tp, d]`` -> ``[s, b, h/tp]``; ``mask [b, 1, s, s_kv]`` (True:
        attend) replaces the causal one when decoding."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.training and self.dropout > 0:
            with get_rng_tracker().fork(MODEL_PARALLEL_RNG_NAME):  # heads differ per TP rank
                out = self.attention_fn(q, k, v, is_causal=True, dropout_p=self.dropout)
        else:
            out = self.attention_fn(q, k, v, is_causal=True)
        b, heads, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


class MLP(nn.Module):
    """``proj(gelu_tanh(fc(x)))``: fc column-parallel, proj row-parallel, both with biases."""

    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        ffn = config.ffn_hidden_size
        self.fc = _column(config, f"layers.{layer_number}.mlp.fc", [ffn])
        self.proj = _row(config, f"layers.{layer_number}.mlp.proj", ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # HF's gelu_new


class DecoderLayer(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.input_norm = _layer_norm(config)
        self.attention = Attention(config, layer_number)
        self.post_attention_norm = _layer_norm(config)
        self.mlp = MLP(config, layer_number)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), kv_cache)
        return x + self.mlp(self.post_attention_norm(x))


class GPT2Model(PipelineStage):
    """One GPT-2 chunk: this rank's pipeline stage, sharded over TP (arguments and
    ``forward`` as `engine.models.llama.model.LlamaModel`'s)."""

    def __init__(
        self,
        config: ModelConfig,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        layer_numbers: list[int] | None = None,
    ):
        ps = parallel_state
        config.validate(ParallelConfig(
            _tp(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(),
        ))  # fmt: skip
        if config.kv_heads != config.num_attention_heads:
            raise ValueError("GPT-2 has multi-head attention: leave num_query_groups unset")
        super().__init__(config, pre_process, post_process, layer_numbers)
        layer_numbers = self.layer_numbers
        h, dtype = config.hidden_size, config.params_dtype
        if self.pre_process:
            self.embedding = VocabParallelEmbedding(
                config.vocab_size, h, sequence_parallel=config.sequence_parallel,
                make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
                init_method=seeded_init(config, "embedding"), dtype=dtype,
            )  # fmt: skip
            # Replicated; under sequence parallelism each rank adds its slice's positions only.
            positions = config.max_position_embeddings
            self.position_embedding = nn.Embedding(positions, h, dtype=dtype)
            weight = cast(nn.Parameter, self.position_embedding.weight)
            init = seeded_init(config, "position_embedding")
            initialise_shard(weight, (positions, h), init, 0, [positions], 0, 1)
            mark_partial_over_tp(weight, config.sequence_parallel)
        self.layers = nn.ModuleList(DecoderLayer(config, n) for n in layer_numbers)
        if self.post_process:
            self.final_norm = _layer_norm(config)
            seed_name = "embedding" if config.tie_word_embeddings else "output_layer"
            self.build_output_layer(seeded_init(config, seed_name))
        check_built_as_declared(self, layer_numbers, self.pre_process, self.post_process)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Loss ``[b, s]`` (with labels) or logits ``[b, s, V/tp]`` on the last stage, hidden
        states ``[s(/tp), b, h]`` elsewhere; ``position_ids [b, s]`` default to ``0..s-1``."""
        decoder_input = self.input_tensor if decoder_input is None else decoder_input
        if self.pre_process:
            if input_ids is None:
                raise ValueError("this pipeline stage holds the embedding: pass input_ids")
            x = self._embed(input_ids, position_ids)
        elif decoder_input is None:
            raise ValueError("this pipeline stage has no embedding: pass decoder_input")
        else:
            x = decoder_input
        for layer in self.layers:
            if self.config.recompute_granularity == "full" and kv_cache is None:
                x = checkpoint(layer, x)
            else:
                x = layer(x, kv_cache)
        if not self.post_process:
            return x
        return self.head(self.final_norm(x), labels)

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """``[b, s]`` ids -> token + position embeddings ``[s(/tp), b, h]``."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        if not self.config.sequence_parallel:
            x = self.embedding(input_ids) + self.position_embedding(position_ids)
            return x.transpose(0, 1).contiguous()
        if s % self.tp != 0:
            raise ValueError(
                f"sequence length {s} must be divisible by --tensor-model-parallel-size "
                f"({self.tp}) with --sequence-parallel"
            )
        chunk = s // self.tp
        start = parallel_state.get_tensor_model_parallel_rank() * chunk
        positions = position_ids.t()[start : start + chunk]  # this rank's slice of the sequence
        return self.embedding(input_ids.t()) + self.position_embedding(positions)
