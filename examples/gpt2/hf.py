"""The GPT-2 family's HuggingFace adapter: ``config.json`` <-> `ModelConfig` for
`transformers`' GPT2LMHeadModel (tensor names and the Conv1D transposes are the inventory's).

Dropout is a training choice, not architecture: ``resid_pdrop`` / ``embd_pdrop`` /
``attn_pdrop`` are not read (the engine's GPT-2 has only ``--attention-dropout``), and the
export writes the attention dropout the model was configured with and no other.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.models.config import ModelConfig
from engine.models.families import HFAdapter


def canonical_from_hf(
    state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel state dict -> canonical tensors (named and, for Conv1D weights,
    transposed as the inventory says; HF's attention-mask buffers, if any, are skipped)."""
    inventory = config.inventory()
    rename, tensors = inventory.renamer("hf", "name"), inventory.canonical_by_name()
    out = {}
    for hf_name, tensor in state.items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) and tensor.dim() != 1:
            continue
        name = rename(hf_name)  # a tied lm_head is kept: the last stage's copy loads from it
        transposed = name in tensors and tensors[name].hf_transposed
        out[name] = tensor.t() if transposed else tensor
    return out


# Fields whose non-default value changes the computation in a way the engine's GPT-2 does not.
_UNSUPPORTED = {
    "scale_attn_by_inverse_layer_idx": (False, "attention scores scaled by 1 / layer index"),
    "reorder_and_upcast_attn": (False, "attention reordered and upcast to float32"),
    "scale_attn_weights": (True, "attention scores not scaled by 1 / sqrt(head_dim)"),
    "add_cross_attention": (False, "cross-attention layers"),
}


def config_from_hf(hf: dict[str, Any], make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """A `ModelConfig` (family "gpt2") from a HF ``config.json`` dict of a GPT2LMHeadModel;
    ValueError naming every field the engine cannot represent."""
    problems = [
        f"{field} {hf[field]!r} ({what}: unsupported)"
        for field, (default, what) in _UNSUPPORTED.items()
        if field in hf and bool(hf[field]) != default
    ]
    activation = hf.get("activation_function", "gelu_new")
    if activation != "gelu_new":
        problems.append(f"activation_function {activation!r} (only 'gelu_new' is supported)")
    h, heads = hf["n_embd"], hf["n_head"]
    if h % heads != 0:
        problems.append(f"n_embd {h} is not divisible by n_head {heads}")
    if problems:
        raise ValueError("; ".join(problems))
    return ModelConfig(
        num_layers=hf["n_layer"],
        hidden_size=h,
        num_attention_heads=heads,
        ffn_hidden_size=hf.get("n_inner") or 4 * h,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["n_positions"],
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_method_std=hf.get("initializer_range", 0.02),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        family="gpt2",
    )


def hf_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ``transformers.GPT2Config`` for the same architecture."""
    return dict(
        vocab_size=config.vocab_size,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_attention_heads,
        n_inner=config.ffn_hidden_size,
        activation_function="gelu_new",
        layer_norm_epsilon=config.norm_epsilon,
        initializer_range=config.init_method_std,
        tie_word_embeddings=config.tie_word_embeddings,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=config.attention_dropout,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
    )


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the HF GPT2LMHeadModel with the same architecture (``transformers``
    writes it when installed, so its defaults and version are those of the reader)."""
    # GPT-2's token ids (50256) belong to its tokenizer, not the architecture: none here (the
    # converter writes those of the directory it converted from).
    kwargs = {**hf_config_kwargs(config), "bos_token_id": None, "eos_token_id": None}
    try:
        import transformers
    except ImportError:
        out = {**kwargs, "model_type": "gpt2"}
    else:
        out = transformers.GPT2Config(**kwargs).to_dict()
    out.update(architectures=["GPT2LMHeadModel"], dtype=str(dtype).removeprefix("torch."))
    return out


def source_name(name: str) -> str | None:
    """The Hub's original GPT-2 files (and any saved ``GPT2Model``) name the weights without
    the ``transformer.`` prefix, and older ones keep the causal-mask buffers ``attn.bias`` /
    ``attn.masked_bias``, which are not weights."""
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


HF_ADAPTER = HFAdapter(("gpt2",), config_from_hf, config_to_hf, source_name)
