"""The LLaMA family, built from tensor-parallel layers.

Read top to bottom: rotary embedding, RMSNorm, attention, MLP, decoder layer, model. The
parallel policy is visible here (and stated as data, for checkpoints and conversion, in the
family's parameter inventory, `engine.models.llama.inventory`, whose optional parameters such
as biases the layers build when it declares them):

- Q|K|V and gate|up are column-parallel (each rank owns whole heads / a slice of the FFN);
  the attention output and down projections are row-parallel, so each sub-block costs one
  all-reduce (one all-gather + one reduce-scatter with sequence parallelism).
- K/V heads are sharded when there are at least as many as TP ranks, replicated otherwise.
- With sequence parallelism, activations between sub-blocks (norms, residuals) are sharded
  along the sequence: ``[s/tp, b, h]``.

Activations are sequence-first ``[s, b, h]`` inside the decoder, as in Megatron.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import parallel_state
from engine.context_parallel import (
    BLOCK_BACKENDS,
    all_to_all_attention,
    local_positions,
    ring_attention,
)
from engine.models.backends import ATTENTION_BACKENDS, NORM_BACKENDS, resolve_backend
from engine.models.config import ModelConfig
from engine.models.init import blocks_init, output_std, seeded_init
from engine.models.inventory import Inventory
from engine.models.kv_cache import KVCache
from engine.models.rope import RopeScaling, inverse_frequencies
from engine.models.stage import PipelineStage
from engine.models.weights import check_built_as_declared
from engine.parallel_state import ParallelConfig
from engine.tensor_parallel import (
    ColumnParallelLinear,
    InitMethod,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from engine.tensor_parallel.attributes import mark_partial_over_tp
from engine.tensor_parallel.layers import initialise_shard
from engine.tensor_parallel.random import MODEL_PARALLEL_RNG_NAME, checkpoint, get_rng_tracker


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the "rotate half" convention of HF and Megatron), with the
    frequencies that `engine.models.rope` gives for the configuration's rope scaling."""

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling | None = None,
                 max_position_embeddings: int = 4096):  # fmt: skip
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.scaling, self.max_positions = scaling, max_position_embeddings

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """position_ids ``[b, s]`` -> cos, sin ``[s, b, 1, d]`` in ``dtype``."""
        # Computed per call, not cached in a buffer: a buffer made under the meta device (or
        # before `.to(device)`) would hold nothing, and this costs one [s, d] outer product.
        inv_freq, attention_scaling = inverse_frequencies(
            self.head_dim, self.base, self.scaling, self.max_positions
        )
        inv_freq = inv_freq.to(position_ids.device)
        angles = position_ids.t().float().unsqueeze(-1) * inv_freq  # [s, b, d/2]
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
        cos, sin = angles.cos() * attention_scaling, angles.sin() * attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[s, b, heads, d]`` rotated by the angles in cos/sin ``[s, b, 1, d]``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class RMSNorm(nn.Module):
    """RMSNorm with a replicated weight ``[width]`` (default: the model width h).

    Under sequence parallelism a layer norm's gradient is partial on each TP rank (each sees a
    slice of the sequence); a per-head norm's always is (each rank normalises its own heads
    with the shared weight): ``partial_over_tp`` says which.
    """

    def __init__(self, config: ModelConfig, width: int | None = None,
                 partial_over_tp: bool | None = None):  # fmt: skip
        super().__init__()
        self.eps = config.norm_epsilon
        width = width or config.hidden_size
        self.weight = nn.Parameter(torch.ones(width, dtype=config.params_dtype))
        partial = config.sequence_parallel if partial_over_tp is None else partial_over_tp
        mark_partial_over_tp(self.weight, partial)
        self.norm_fn = NORM_BACKENDS[resolve_backend(config.norm_backend)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[*, width]`` -> the same shape."""
        return self.norm_fn(x, self.weight, self.eps)


class ReplicatedKeyValue(nn.Module):
    """K/V projection when there are fewer K/V heads than TP ranks.

    Every rank holds all K/V heads (a replicated weight ``[2 * kv * d, h]``) but computes
    only the one its query heads use; each rank's weight gradient is therefore partial and is
    summed over TP by `finalize_model_grads`.
    """

    def __init__(self, config: ModelConfig, init_method: InitMethod, bias: bool = False):
        super().__init__()
        kv, d, tp = config.kv_heads, config.head_dim, _tp_size()
        self.sequence_parallel = config.sequence_parallel
        self.head_dim, self.kv_heads = d, kv
        self.head = parallel_state.get_tensor_model_parallel_rank() // (tp // kv)
        rows = 2 * kv * d
        self.weight = nn.Parameter(torch.empty(rows, config.hidden_size, dtype=config.params_dtype))
        initialise_shard(self.weight, (rows, config.hidden_size), init_method, 0, [rows], 0, 1)
        mark_partial_over_tp(self.weight)
        self.bias = None
        if bias:  # zeros, as the column-parallel layers' biases
            self.bias = nn.Parameter(torch.zeros(rows, dtype=config.params_dtype))
            mark_partial_over_tp(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[s(/tp), b, h]`` -> this rank's K|V ``[s, b, 2 * d]``."""
        # With sequence parallelism this all-gather repeats the query projection's; it is
        # only paid in this uncommon layout (fewer K/V heads than TP ranks).
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x)
        else:
            x = copy_to_tensor_model_parallel_region(x)
        bias = None if self.bias is None else self.head_rows(self.bias)
        return F.linear(x, self.head_rows(self.weight), bias)

    def head_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's K head and V head rows of the K|V weight or bias (or of anything laid
        out as its rows: LoRA's B)."""
        d, start = self.head_dim, self.head * self.head_dim
        v_start = self.kv_heads * d + start
        return torch.cat([t[start : start + d], t[v_start : v_start + d]])


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query attention."""

    def __init__(self, config: ModelConfig, layer_number: int, inventory: Inventory | None = None):
        super().__init__()
        inventory = inventory or config.inventory(_tp_size())
        self.layer_number = layer_number
        tp, d = _tp_size(), config.head_dim
        heads, groups = config.num_attention_heads, config.kv_heads
        self.local_heads, self.head_dim = heads // tp, d
        self.kv_sharded = groups >= tp
        self.local_kv_heads = groups // tp if self.kv_sharded else 1
        self.dropout = config.attention_dropout
        self.recompute_core = config.recompute_granularity == "selective"
        self.backend = resolve_backend(config.attention_backend)
        self.attention_fn = ATTENTION_BACKENDS[self.backend]
        self.context_parallel = parallel_state.get_context_parallel_world_size() > 1
        self.cp_comm_type = config.cp_comm_type

        prefix = f"layers.{layer_number}.attention"
        q_init = (heads * d, seeded_init(config, f"{prefix}.q"))
        k_init = (groups * d, seeded_init(config, f"{prefix}.k"))
        v_init = (groups * d, seeded_init(config, f"{prefix}.v"))
        common: dict[str, Any] = dict(
            sequence_parallel=config.sequence_parallel, dtype=config.params_dtype
        )
        if self.kv_sharded:
            self.qkv = ColumnParallelLinear(
                config.hidden_size, [heads * d, groups * d, groups * d],
                init_method=blocks_init(q_init, k_init, v_init),
                bias=inventory.declares(f"{prefix}.qkv.bias"), **common,
            )  # fmt: skip
        else:
            self.q = ColumnParallelLinear(
                config.hidden_size, heads * d, init_method=q_init[1],
                bias=inventory.declares(f"{prefix}.q.bias"), **common,
            )  # fmt: skip
            self.kv = ReplicatedKeyValue(
                config, blocks_init(k_init, v_init), inventory.declares(f"{prefix}.kv.bias")
            )
        self.q_norm = self.k_norm = None
        if inventory.declares(f"{prefix}.q_norm.weight"):
            self.q_norm = RMSNorm(config, d, partial_over_tp=True)
            self.k_norm = RMSNorm(config, d, partial_over_tp=True)
        self.out = RowParallelLinear(
            heads * d, config.hidden_size,
            init_method=seeded_init(config, f"{prefix}.out", output_std(config)),
            bias=inventory.declares(f"{prefix}.out.bias"), **common,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``[s(/tp), b, h]`` -> ``[s(/tp), b, h]``.

        With a ``kv_cache`` (decoding, see `engine.models.kv_cache.KVCache`) the new K/V are written
        at the cache's offset and the queries attend over the whole cached prefix under its mask.
        ``document_ids [b, s]`` (packed sequences; the whole sequence's under context
        parallelism) keep attention within each document.
        """
        d = self.head_dim
        if self.kv_sharded:
            q, k, v = self.qkv(x).split(
                [self.local_heads * d, self.local_kv_heads * d, self.local_kv_heads * d], dim=-1
            )
        else:
            q = self.q(x)
            k, v = self.kv(x).chunk(2, dim=-1)
        s, b = q.shape[:2]
        q, k = q.view(s, b, self.local_heads, d), k.view(s, b, self.local_kv_heads, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.view(s, b, self.local_kv_heads, d)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)
            return self.out(self._core_attention(q, k, v, kv_cache.attention_mask))
        if self.recompute_core:
            out = checkpoint(self._core_attention, q, k, v, None, document_ids)
        else:
            out = self._core_attention(q, k, v, None, document_ids)
        return self.out(out)

    def _core_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q ``[s, b, hq/tp, d]``, k/v ``[s_kv, b, hkv', d]`` -> ``[s, b, hq/tp * d]``; an
        explicit boolean ``mask [b, 1, s, s_kv]`` (True: attend) replaces the causal one.
        Under context parallelism ``s`` is this rank's ``s/cp`` tokens of the sequence."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # SDPA's [b, heads, s, d]
        if mask is not None:
            # Decoding (cached prefix, padded prompts) needs an arbitrary mask, which only SDPA
            # takes; the training backends keep their causal fast path.
            gqa = k.size(1) != q.size(1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif self.context_parallel:
            # The sequence is split over the CP group (this rank holds two of its chunks):
            # attention runs across the split (engine.context_parallel).
            group = parallel_state.get_context_parallel_group()
            if self.cp_comm_type == "a2a":
                out = all_to_all_attention(q, k, v, self.attention_fn, group, document_ids)
            else:
                block = BLOCK_BACKENDS[self.backend]
                out = ring_attention(q, k, v, block, group, document_ids=document_ids)
        elif self.training and self.dropout > 0:
            # Heads are sharded over TP, so dropout draws from the per-TP-rank RNG stream.
            with get_rng_tracker().fork(MODEL_PARALLEL_RNG_NAME):
                out = self.attention_fn(
                    q, k, v, is_causal=True, dropout_p=self.dropout, document_ids=document_ids
                )
        else:
            out = self.attention_fn(q, k, v, is_causal=True, document_ids=document_ids)
        b, heads, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate|up fused and column-parallel."""

    def __init__(self, config: ModelConfig, layer_number: int, inventory: Inventory | None = None):
        super().__init__()
        inventory = inventory or config.inventory(_tp_size())
        h, ffn = config.hidden_size, config.ffn_hidden_size
        prefix = f"layers.{layer_number}.mlp"
        common: dict[str, Any] = dict(
            sequence_parallel=config.sequence_parallel, dtype=config.params_dtype
        )
        self.gate_up = ColumnParallelLinear(
            h, [ffn, ffn],
            init_method=blocks_init(
                (ffn, seeded_init(config, f"{prefix}.gate")),
                (ffn, seeded_init(config, f"{prefix}.up")),
            ),
            bias=inventory.declares(f"{prefix}.gate_up.bias"), **common,
        )  # fmt: skip
        self.down = RowParallelLinear(
            ffn, h, init_method=seeded_init(config, f"{prefix}.down", output_std(config)),
            bias=inventory.declares(f"{prefix}.down.bias"), **common,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, layer_number: int, inventory: Inventory | None = None):
        super().__init__()
        inventory = inventory or config.inventory(_tp_size())
        self.layer_number = layer_number
        self.input_norm = RMSNorm(config)
        self.attention = Attention(config, layer_number, inventory)
        self.post_attention_norm = RMSNorm(config)
        self.mlp = MLP(config, layer_number, inventory)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), cos, sin, kv_cache, document_ids)
        return x + self.mlp(self.post_attention_norm(x))


class LlamaModel(PipelineStage):
    """A LLaMA decoder holding only this rank's share: its pipeline stage, sharded over TP.

    Args:
        config: the architecture (see `ModelConfig`).
        pre_process: this chunk owns the embedding (default: first pipeline stage).
        post_process: this chunk owns the final norm and output head (default: last stage).
        layer_numbers: global indices of the layers to build (default: an even split of
            ``num_layers`` over the pipeline stages).

    Build under ``with torch.device("meta"):`` to get shapes without memory.
    """

    def __init__(
        self,
        config: ModelConfig,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        layer_numbers: list[int] | None = None,
    ):
        config.validate(
            ParallelConfig(
                tensor_model_parallel_size=_tp_size(),
                pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                virtual_pipeline_model_parallel_size=(
                    parallel_state.get_virtual_pipeline_model_parallel_world_size()
                ),
            ),
        )
        super().__init__(config, pre_process, post_process, layer_numbers)
        layer_numbers = self.layer_numbers
        embedding_kwargs: dict[str, Any] = dict(
            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
            sequence_parallel=config.sequence_parallel,
            init_method=seeded_init(config, "embedding"),
            dtype=config.params_dtype,
        )
        if self.pre_process:
            self.embedding = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, **embedding_kwargs
            )
        self.rotary = RotaryEmbedding(
            config.head_dim, config.rotary_base, config.rope_scaling, config.max_position_embeddings
        )
        self.layers = nn.ModuleList(DecoderLayer(config, n, self.inventory) for n in layer_numbers)
        if self.post_process:
            self.final_norm = RMSNorm(config)
            # A tied head off the first stage is initialised like the embedding (same seed).
            head_seed_name = "embedding" if config.tie_word_embeddings else "output"
            self.build_output_layer(seeded_init(config, head_seed_name))
        check_built_as_declared(self, layer_numbers, self.pre_process, self.post_process)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run this chunk.

        Args:
            input_ids: ``[b, s]`` token ids (first stage).
            position_ids: ``[b, s]``; default ``0..s-1``.
            labels: ``[b, s]`` next-token ids (last stage); with them the output is the loss.
            decoder_input: ``[s(/tp), b, h]`` hidden states from the previous stage.
            kv_cache: decoding only (`engine.models.kv_cache.KVCache`): attend over the cached
                prefix; ``position_ids`` then give each new token's absolute position.
            document_ids: ``[b, s]`` packed documents (SFT packing, ``--reset-attention-mask``):
                each token attends only within its document. The whole sequence's ids under
                context parallelism, where the other inputs are this rank's chunks.

        Returns:
            Last stage: per-token loss ``[b, s]`` (float32) with labels, else logits
            ``[b, s, padded_vocab/tp]`` (this rank's vocabulary slice). Other stages: hidden
            states ``[s(/tp), b, h]`` for the next stage.
        """
        if decoder_input is None:
            decoder_input = self.input_tensor
        if self.pre_process:
            if input_ids is None:
                raise ValueError("this pipeline stage holds the embedding: pass input_ids")
            x = self._embed(input_ids)
        elif decoder_input is None:
            raise ValueError("this pipeline stage has no embedding: pass decoder_input")
        else:
            x = decoder_input
        if position_ids is None:
            position_ids = self._default_positions(x).unsqueeze(0).expand(x.size(1), -1)
        cos, sin = self.rotary(position_ids, x.dtype)

        for layer in self.layers:
            # Decoding has no backward to recompute for; the cache must reach every layer.
            if self.config.recompute_granularity == "full" and kv_cache is None:
                x = checkpoint(layer, x, cos, sin, None, document_ids)
            else:
                x = layer(x, cos, sin, kv_cache, document_ids)
        if not self.post_process:
            return x

        return self.head(self.final_norm(x), labels)

    def _default_positions(self, x: torch.Tensor) -> torch.Tensor:
        """``0..s-1`` for the hidden states ``x [s(/tp)(/cp), b, h]``; under context
        parallelism the positions of this rank's chunks of the sequence."""
        seq = x.size(0) * (self.tp if self.config.sequence_parallel else 1)
        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            return torch.arange(seq, device=x.device)
        rank = parallel_state.get_context_parallel_rank()
        return local_positions(seq * cp, rank, cp, x.device)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids -> ``[s(/tp), b, h]``."""
        if self.config.sequence_parallel and input_ids.size(1) % self.tp != 0:
            raise ValueError(
                f"sequence length {input_ids.size(1)} must be divisible by "
                f"--tensor-model-parallel-size ({self.tp}) with --sequence-parallel"
            )
        # Looking up the transposed ids gives sequence-first rows directly: no [b, s, h] copy.
        return self.embedding(input_ids.t())


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()
