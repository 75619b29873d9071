"""The LLaMA family's HuggingFace adapter: ``config.json`` <-> `ModelConfig` for
`transformers`' LlamaForCausalLM (tensor names are the inventory's).

Both sides use the "rotate half" rotary convention, so weights map one to one (no Q/K
permutation); only names differ.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.models.config import ModelConfig
from engine.models.families import HFAdapter
from engine.models.llama.inventory import llama_inventory


def canonical_from_hf(
    state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM state dict -> canonical tensors (rotary buffers are skipped); the
    names are the inventory's (`engine.models.llama.inventory`)."""
    rename = llama_inventory(config, 1).renamer("hf", "name")
    return {
        rename(name): tensor
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


def model_config_from_hf(
    hf: dict[str, Any], make_vocab_size_divisible_by: int = 128
) -> ModelConfig:
    """A `ModelConfig` from a HF ``config.json`` dict of a ``LlamaForCausalLM``; ValueError
    naming every field the engine cannot represent (biases, rope scaling, ...)."""
    problems = []
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            problems.append(f"{field} true (the engine's LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU needs 'silu')")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp {hf['pretraining_tp']} (must be 1)")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else rope.get("rope_type")
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling {rope_type!r} (only plain rotary embeddings are supported)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    if problems:
        raise ValueError("; ".join(problems))
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_epsilon=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the HF model with the same architecture (``transformers`` writes it
    when installed, so its defaults and version are those of the reader)."""
    kwargs = hf_config_kwargs(config)
    try:
        import transformers
    except ImportError:
        theta = kwargs.pop("rope_theta")
        kwargs.update(
            rope_parameters={"rope_type": "default", "rope_theta": theta}, hidden_act="silu",
            model_type="llama", head_dim=config.head_dim,
        )  # fmt: skip
        out = kwargs
    else:
        out = transformers.LlamaConfig(**kwargs).to_dict()
    out.update(architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch."))
    return out


def source_name(name: str) -> str | None:
    """Rotary ``inv_freq`` buffers (older checkpoints save them) are not weights."""
    return None if name.endswith("rotary_emb.inv_freq") else name


HF_ADAPTER = HFAdapter(("llama",), model_config_from_hf, hf_config_dict, source_name)
