"""Meta's original LLaMA checkpoints (``params.json`` + ``consolidated.00.pth``), seen as HF.

Meta's reference code applies rotary embeddings to *interleaved* pairs of each head's
dimensions ``(0, 1), (2, 3), ...`` (complex multiplication); HF and this engine rotate the
two *halves* ``(i, i + d/2)``. The two agree once the rows of W_q and W_k are permuted within
each head, so that Meta's pair (2i, 2i+1) lands on (i, i + d/2): `permute_meta_qk` (the
permutation of transformers' ``convert_llama_weights_to_hf.py``). Attention scores are then
identical, since q and k are permuted alike. V, the output projection and the MLP need no
change.

`MetaCheckpoint` exposes such a directory with HF names, HF-convention Q/K and a HF
``config.json`` dict, so `engine.conversion.convert.hf_to_engine` converts it like a HF directory.
Only single-file checkpoints (model-parallel size 1: LLaMA-2-7B, LLaMA-3-8B) are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.models.config import ModelConfig
from engine.models.llama.inventory import llama_inventory


def permute_meta_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """W_q or W_k ``[heads * d, h]`` from Meta's interleaved rotary convention to
    rotate-half: within each head, row ``2i + j`` moves to ``i + j * d/2``."""
    rows, h = weight.shape
    return weight.view(heads, rows // heads // 2, 2, h).transpose(1, 2).reshape(rows, h)


def meta_ffn_hidden_size(params: dict[str, Any]) -> int:
    """The SwiGLU width Meta's ``FeedForward`` derives from ``dim``, ``multiple_of`` and
    ``ffn_dim_multiplier``."""
    hidden = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple = params.get("multiple_of", 256)
    return multiple * ((hidden + multiple - 1) // multiple)


class MetaCheckpoint:
    """A Meta LLaMA directory read lazily (the ``.pth`` is memory-mapped), under HF names."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        shards = sorted(self.directory.glob("consolidated.*.pth"))
        if not (self.directory / "params.json").is_file() or not shards:
            raise ValueError(f"{self.directory} has no params.json and consolidated.*.pth")
        if len(shards) > 1:
            raise ValueError(
                f"{self.directory} holds {len(shards)} model-parallel shards; only single-file "
                "Meta checkpoints are read: convert it with transformers' "
                "convert_llama_weights_to_hf.py, then use hf-to-engine"
            )
        params = json.loads((self.directory / "params.json").read_text())
        self._state = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
        self._heads = params["n_heads"]
        self._kv_heads = params.get("n_kv_heads") or self._heads
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab < 0:  # LLaMA-2's params.json leaves it to the tokenizer
            vocab = self._state["tok_embeddings.weight"].shape[0]
        self.hf_config = {
            "model_type": "llama", "hidden_size": params["dim"],
            "num_hidden_layers": params["n_layers"], "num_attention_heads": self._heads,
            "num_key_value_heads": self._kv_heads,
            "intermediate_size": meta_ffn_hidden_size(params), "vocab_size": vocab,
            "rms_norm_eps": params.get("norm_eps", 1e-5),
            "rope_theta": params.get("rope_theta", 10000.0),
            "max_position_embeddings": params.get("max_seq_len", 4096),
            "tie_word_embeddings": False,
        }  # fmt: skip
        architecture = ModelConfig(
            num_layers=params["n_layers"], hidden_size=params["dim"],
            num_attention_heads=self._heads, num_query_groups=self._kv_heads,
            ffn_hidden_size=meta_ffn_hidden_size(params), vocab_size=vocab,
        )  # fmt: skip
        # The names are the inventory's (engine.models.llama.inventory), Meta's beside HF's.
        to_hf = llama_inventory(architecture, 1).renamer("meta", "hf")
        self._meta_name = {}
        for name in self._state:
            if name == "rope.freqs":  # recomputed, not a weight
                continue
            try:
                self._meta_name[to_hf(name)] = name
            except KeyError:
                raise ValueError(f"tensor {name} has no counterpart in a LLaMA model") from None
        if params.get("use_scaled_rope"):
            self.hf_config["rope_scaling"] = {"rope_type": "llama3"}  # refused by the converter

    def names(self) -> list[str]:
        return list(self._meta_name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[self._meta_name[name]].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[self._meta_name[name]].dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor under its HF name, Q/K permuted to the rotate-half convention."""
        tensor = self._state[self._meta_name[name]]
        if name.endswith("q_proj.weight"):
            return permute_meta_qk(tensor, self._heads)
        if name.endswith("k_proj.weight"):
            return permute_meta_qk(tensor, self._kv_heads)
        return tensor
