"""Names and configuration shared with HuggingFace `transformers`' LlamaForCausalLM.

Both sides use the "rotate half" rotary convention, so weights map one to one (no Q/K
permutation); only names differ. Works on the canonical view of `engine.models.weights`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from engine.models.config import ModelConfig

# (HuggingFace pattern, canonical pattern); {n} is the layer number.
_NAME_PAIRS = [
    ("model.embed_tokens.weight", "embedding.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "output_layer.weight"),
    ("model.layers.{n}.input_layernorm.weight", "layers.{n}.input_norm.weight"),
    ("model.layers.{n}.post_attention_layernorm.weight", "layers.{n}.post_attention_norm.weight"),
    ("model.layers.{n}.self_attn.q_proj.weight", "layers.{n}.attention.q.weight"),
    ("model.layers.{n}.self_attn.k_proj.weight", "layers.{n}.attention.k.weight"),
    ("model.layers.{n}.self_attn.v_proj.weight", "layers.{n}.attention.v.weight"),
    ("model.layers.{n}.self_attn.o_proj.weight", "layers.{n}.attention.out.weight"),
    ("model.layers.{n}.mlp.gate_proj.weight", "layers.{n}.mlp.gate.weight"),
    ("model.layers.{n}.mlp.up_proj.weight", "layers.{n}.mlp.up.weight"),
    ("model.layers.{n}.mlp.down_proj.weight", "layers.{n}.mlp.down.weight"),
]


def _renamer(pairs: list[tuple[str, str]]):
    compiled = [
        (re.compile("^" + re.escape(src).replace(r"\{n\}", r"(\d+)") + "$"), dst)
        for src, dst in pairs
    ]

    def rename(name: str) -> str:
        for pattern, dst in compiled:
            match = pattern.match(name)
            if match:
                return dst.replace("{n}", match.group(1)) if match.groups() else dst
        raise KeyError(f"tensor {name} has no counterpart in a LLaMA model")

    return rename


hf_to_canonical_name = _renamer(_NAME_PAIRS)
canonical_to_hf_name = _renamer([(dst, src) for src, dst in _NAME_PAIRS])


def canonical_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM state dict -> canonical tensors (rotary buffers are skipped)."""
    return {
        hf_to_canonical_name(name): tensor
        for name, tensor in state.items()
        if not name.endswith("rotary_emb.inv_freq")
    }


def hf_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ``transformers.LlamaConfig`` for the same architecture."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rotary_base,
        rms_norm_eps=config.norm_epsilon,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
