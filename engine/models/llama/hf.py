"""HuggingFace adapters of the LLaMA decoder and the families built on it: ``config.json``
<-> `ModelConfig` for ``transformers``' LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM and Qwen3ForCausalLM (tensor names are the inventory's).

Each HF class is a `HFDialect` of the same decoder: what it always has (Qwen2's Q/K/V biases,
Qwen3's Q/K norms) and which of its options the engine cannot build (refused by name, never
dropped). Both sides use the "rotate half" rotary convention, so weights map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.models.config import ModelConfig
from engine.models.families import HFAdapter
from engine.models.llama.inventory import llama_inventory
from engine.models.rope import rope_scaling_from_hf, rope_scaling_to_hf


@dataclass(frozen=True)
class HFDialect:
    """One ``transformers`` class of the decoder."""

    family: str
    """The engine family that builds it (`ModelConfig.family`)."""
    model_type: str
    """``config.json``'s ``model_type``."""
    architecture: str
    """The causal-LM class named in ``architectures`` (``Qwen2ForCausalLM``)."""
    config_class: str
    """The ``transformers`` configuration class that writes its ``config.json``."""
    qkv_bias: bool = False
    """The class always has Q/K/V biases (Qwen2 has no flag for them)."""
    qk_layernorm: bool = False
    """The class always normalises query and key heads (Qwen3)."""
    sliding_window_flag: str | None = None
    """A flag that turns the class' ``sliding_window`` on (Qwen's ``use_sliding_window``);
    None: a non-null ``sliding_window`` is on (Mistral)."""


LLAMA = HFDialect("llama", "llama", "LlamaForCausalLM", "LlamaConfig")

_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def canonical_from_hf(
    state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """A HF state dict of the decoder -> canonical tensors (rotary buffers are skipped); the
    names are the inventory's (`engine.models.llama.inventory`)."""
    rename = llama_inventory(config, 1).renamer("hf", "name")
    return {rename(name): tensor for name, tensor in state.items() if source_name(name)}


def hf_config_kwargs(config: ModelConfig, dialect: HFDialect = LLAMA) -> dict[str, Any]:
    """Keyword arguments of the dialect's ``transformers`` configuration class for the same
    architecture (``rope_parameters`` as transformers 5 takes them, ``rope_theta`` /
    ``rope_scaling`` for 4.x)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_epsilon,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    if dialect.model_type in ("llama", "qwen3"):
        kwargs["attention_bias"] = False  # these classes' flag biases the output too
    if dialect.model_type == "llama":
        kwargs["mlp_bias"] = False
    rope = rope_scaling_to_hf(config.rope_scaling, config.rotary_base)
    if _transformers_major() >= 5:
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = rope if config.rope_scaling is not None else None
    return kwargs


def _transformers_major() -> int:
    try:
        import transformers
    except ImportError:
        return 5  # without transformers, config.json is written in its current form
    return int(transformers.__version__.split(".")[0])


def config_from_hf(
    hf: dict[str, Any], make_vocab_size_divisible_by: int, dialect: HFDialect
) -> ModelConfig:
    """A `ModelConfig` from a HF ``config.json`` dict of the dialect's class; ValueError
    naming every field the engine cannot represent (an output or MLP bias, a sliding window,
    experts, an unsupported rope type, ...)."""
    problems = []
    architectures = hf.get("architectures") or [dialect.architecture]
    if dialect.architecture not in architectures:
        problems.append(
            f"architectures {architectures} (model_type {dialect.model_type!r} converts as "
            f"{dialect.architecture})"
        )
    if hf.get("attention_bias") and dialect.model_type in ("llama", "qwen3"):
        problems.append("attention_bias true (the output projection would need a bias)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias true (the MLP has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU needs 'silu')")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp {hf['pretraining_tp']} (must be 1)")
    window_on = hf.get(dialect.sliding_window_flag) if dialect.sliding_window_flag else True
    if window_on and hf.get("sliding_window") is not None:
        problems.append(
            f"sliding_window {hf['sliding_window']} (attention is full causal attention)"
        )
    problems += [f"{f} {hf[f]} (no mixture of experts)" for f in _MOE_FIELDS if hf.get(f)]
    try:
        rope_scaling = rope_scaling_from_hf(hf)
    except ValueError as error:
        problems.append(str(error))
        rope_scaling = None
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    if problems:
        raise ValueError("; ".join(problems))
    rope = hf.get("rope_parameters") or {}
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=rope_scaling,
        kv_channels=None if head_dim * heads == hidden else head_dim,
        qkv_bias=dialect.qkv_bias,
        qk_layernorm=dialect.qk_layernorm,
        norm_epsilon=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        family=dialect.family,
    )


def config_to_hf(config: ModelConfig, dtype: torch.dtype, dialect: HFDialect) -> dict[str, Any]:
    """``config.json`` of the dialect's HF model with the same architecture (``transformers``
    writes it when installed, so its defaults and version are those of the reader);
    ValueError when the configuration has an option the class cannot hold."""
    extra = [
        flag
        for flag, on, fixed in (
            ("--add-qkv-bias", config.qkv_bias, dialect.qkv_bias),
            ("--qk-layernorm", config.qk_layernorm, dialect.qk_layernorm),
        )
        if on != fixed
    ]
    if extra:
        raise ValueError(
            f"{dialect.architecture} cannot hold this model: {', '.join(extra)} "
            f"{'differs' if len(extra) == 1 else 'differ'} from the class' fixed architecture"
        )
    kwargs = hf_config_kwargs(config, dialect)
    try:
        import transformers
    except ImportError:
        kwargs.update(hidden_act="silu", model_type=dialect.model_type)
        out = kwargs
    else:
        out = getattr(transformers, dialect.config_class)(**kwargs).to_dict()
    out.update(architectures=[dialect.architecture], dtype=str(dtype).removeprefix("torch."))
    return out


def source_name(name: str) -> str | None:
    """Rotary ``inv_freq`` buffers (older checkpoints save them) are not weights."""
    return None if name.endswith("rotary_emb.inv_freq") else name


def hf_adapter(dialect: HFDialect) -> HFAdapter:
    """The family's `HFAdapter` for one dialect."""
    return HFAdapter(
        (dialect.model_type,),
        lambda hf, divisible_by: config_from_hf(hf, divisible_by, dialect),
        lambda config, dtype: config_to_hf(config, dtype, dialect),
        source_name,
    )


HF_ADAPTER = hf_adapter(LLAMA)
