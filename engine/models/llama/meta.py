"""Meta's original LLaMA checkpoints (``params.json`` + ``consolidated.*.pth``), seen as HF.

Meta's reference code applies rotary embeddings to *interleaved* pairs of each head's
dimensions ``(0, 1), (2, 3), ...`` (complex multiplication); HF and this engine rotate the
two *halves* ``(i, i + d/2)``. The two agree once the rows of W_q and W_k are permuted within
each head, so that Meta's pair (2i, 2i+1) lands on (i, i + d/2): `permute_meta_qk` (the
permutation of transformers' ``convert_llama_weights_to_hf.py``). Attention scores are then
identical, since q and k are permuted alike. V, the output projection and the MLP need no
change.

Models too large for one device (LLaMA-2-13B/70B, LLaMA-3-70B) are saved by model-parallel
rank, ``consolidated.00.pth`` .. ``consolidated.{N-1}.pth``: each file holds its rank's shard
of every tensor as fairscale's layers split them (`MERGE_DIMS`). `MetaCheckpoint` merges them
back one tensor at a time, checking each merge against the shape ``params.json`` implies.

`MetaCheckpoint` exposes such a directory with HF names, HF-convention Q/K and a HF
``config.json`` dict, so `engine.conversion.convert.hf_to_engine` converts it like a HF directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from engine.models.config import ModelConfig
from engine.models.llama.inventory import llama_inventory

MERGE_DIMS: dict[str, tuple[int, ...]] = {
    # ColumnParallelLinear splits the output features (rows): Q, K, V, gate, up, the head.
    "layers.{n}.attention.wq.weight": (0,),
    "layers.{n}.attention.wk.weight": (0,),
    "layers.{n}.attention.wv.weight": (0,),
    "layers.{n}.feed_forward.w1.weight": (0,),
    "layers.{n}.feed_forward.w3.weight": (0,),
    "output.weight": (0,),
    # RowParallelLinear splits the input features (columns): the attention output, down.
    "layers.{n}.attention.wo.weight": (1,),
    "layers.{n}.feed_forward.w2.weight": (1,),
    # LLaMA-2's ParallelEmbedding splits the hidden size, LLaMA-3's VocabParallelEmbedding the
    # vocabulary; params.json does not say which, so the one that gives its shape is taken.
    "tok_embeddings.weight": (1, 0),
}
"""The dims along which each tensor of Meta's model is split over its model-parallel shards
(Meta's names, ``{n}`` the layer), in the order tried. Any other tensor (the RMSNorm weights,
``rope.freqs``) is replicated: the same in every shard."""

_SHARD_FILE = re.compile(r"^consolidated\.(\d+)\.pth$")


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


def shard_paths(directory: Path) -> list[Path]:
    """The ``consolidated.NN.pth`` files of a Meta directory in model-parallel rank order;
    ValueError naming any rank missing from 00 to the highest."""
    by_rank = {}
    for path in directory.glob("consolidated.*.pth"):
        match = _SHARD_FILE.match(path.name)
        if match:
            by_rank[int(match.group(1))] = path
    if not by_rank:
        return []
    missing = [f"consolidated.{r:02d}.pth" for r in range(max(by_rank) + 1) if r not in by_rank]
    if missing:
        found = ", ".join(by_rank[r].name for r in sorted(by_rank))
        raise ValueError(
            f"{directory}: model-parallel shard {', '.join(missing)} is missing (found "
            f"{found}); Meta's shards are numbered from 00 without gaps"
        )
    return [by_rank[r] for r in sorted(by_rank)]


def _few(names: list[str]) -> str:
    """Up to three names, then how many more."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _concatenated_shape(shapes: list[tuple[int, ...]], dim: int) -> tuple[int, ...] | None:
    """The shape of the shards concatenated along ``dim``, None if they cannot be."""
    rest = {shape[:dim] + shape[dim + 1 :] for shape in shapes}
    if len(rest) != 1 or any(len(shape) <= dim for shape in shapes):
        return None
    first = shapes[0]
    return first[:dim] + (sum(shape[dim] for shape in shapes),) + first[dim + 1 :]


class MetaCheckpoint:
    """A Meta LLaMA directory under HF names, read lazily: the ``.pth`` shards are
    memory-mapped, and a tensor split over them is concatenated only when asked for."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        paths = shard_paths(self.directory)
        if not (self.directory / "params.json").is_file() or not paths:
            raise ValueError(f"{self.directory} has no params.json and consolidated.*.pth")
        params = json.loads((self.directory / "params.json").read_text())
        self._paths = paths
        self._shards: list[dict[str, torch.Tensor]] = [
            torch.load(path, map_location="cpu", weights_only=True, mmap=True) for path in paths
        ]
        self._check_same_names()
        self._heads = params["n_heads"]
        self._kv_heads = params.get("n_kv_heads") or self._heads
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab < 0:  # LLaMA-2's params.json leaves it to the tokenizer
            vocab = self._vocab_of_output()
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
        inventory = llama_inventory(architecture, 1)
        to_hf = inventory.renamer("meta", "hf")
        self._meta_name = {}
        for name in self._shards[0]:
            if name == "rope.freqs":  # recomputed, not a weight
                continue
            try:
                self._meta_name[to_hf(name)] = name
            except KeyError:
                raise ValueError(f"tensor {name} has no counterpart in a LLaMA model") from None
        # One file: tensors are taken as stored (check_hf_tensors compares their shapes).
        self._merge_dim: dict[str, int | None] = {}
        if len(self._shards) > 1:
            full = {t.meta: t.shape for t in inventory.canonical_tensors() if t.meta}
            self._merge_dim = {name: self._merge_dim_of(name, full) for name in self._shards[0]}
        if params.get("use_scaled_rope"):
            # LLaMA-3.1/3.2: Meta's reference code fixes these (the factor is 32 for 3.2's
            # small models, which name it in params.json).
            self.hf_config["rope_scaling"] = {
                "rope_type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }  # fmt: skip

    def names(self) -> list[str]:
        return list(self._meta_name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The merged shape (no tensor is read)."""
        meta = self._meta_name[name]
        shapes = [tuple(shard[meta].shape) for shard in self._shards]
        dim = self._merge_dim.get(meta)
        merged = shapes[0] if dim is None else _concatenated_shape(shapes, dim)
        assert merged is not None  # _merge_dim_of only keeps dims the shards concatenate along
        return merged

    def dtype(self, name: str) -> torch.dtype:
        return self._shards[0][self._meta_name[name]].dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor under its HF name, merged from the shards, then Q/K permuted to the
        rotate-half convention (the permutation is over the full tensor's heads)."""
        meta = self._meta_name[name]
        dim = self._merge_dim.get(meta)
        if dim is None:  # one file, or replicated: shard 0's copy (checked equal to the rest)
            tensor = self._shards[0][meta]
        else:
            tensor = torch.cat([shard[meta] for shard in self._shards], dim)
        if name.endswith("q_proj.weight"):
            return permute_meta_qk(tensor, self._heads)
        if name.endswith("k_proj.weight"):
            return permute_meta_qk(tensor, self._kv_heads)
        return tensor

    def _check_same_names(self) -> None:
        """Every shard holds the tensors the first does, and no other."""
        first = set(self._shards[0])
        for path, shard in zip(self._paths[1:], self._shards[1:], strict=True):
            lacks, extra = sorted(first - set(shard)), sorted(set(shard) - first)
            problems = [f"{path.name} lacks {_few(lacks)}"] if lacks else []
            if extra:
                problems.append(f"{path.name} has {_few(extra)}, which {self._paths[0].name} lacks")
            if problems:
                raise ValueError(
                    f"{self.directory}: the {len(self._paths)} model-parallel shards hold "
                    f"different tensors: {'; '.join(problems)}"
                )

    def _vocab_of_output(self) -> int:
        """The vocabulary size from the output layer, split along the vocabulary by every
        LLaMA (the embedding is split along the hidden size by LLaMA-2)."""
        if "output.weight" not in self._shards[0]:
            raise ValueError(
                f"{self.directory}: params.json has no vocab_size and there is no "
                "output.weight to take it from"
            )
        return sum(shard["output.weight"].shape[0] for shard in self._shards)

    def _merge_dim_of(self, name: str, full: dict[str, tuple[int, ...]]) -> int | None:
        """The dim along which the shards of ``name`` concatenate to the shape params.json
        implies (``full``, by Meta name); None for a replicated tensor, after checking that
        every shard holds the same values."""
        tensors = [shard[name] for shard in self._shards]
        others = list(zip(self._paths[1:], tensors[1:], strict=True))
        for path, tensor in others:
            if tensor.dtype != tensors[0].dtype:
                raise ValueError(
                    f"{path}: tensor {name} is {tensor.dtype}, {tensors[0].dtype} in "
                    f"{self._paths[0].name}"
                )
        dims = MERGE_DIMS.get(re.sub(r"^layers\.\d+\.", "layers.{n}.", name), ())
        if not dims:
            for path, tensor in others:
                if tensor.shape != tensors[0].shape or not torch.equal(tensor, tensors[0]):
                    raise ValueError(
                        f"{path}: tensor {name} differs from {self._paths[0].name}'s; it is "
                        "replicated (a norm or rope.freqs), so every model-parallel shard "
                        "must hold the same values"
                    )
            return None
        shapes = [tuple(tensor.shape) for tensor in tensors]
        for dim in dims:
            if _concatenated_shape(shapes, dim) == full[name]:
                return dim
        per_file = ", ".join(f"{p.name} {s}" for p, s in zip(self._paths, shapes, strict=True))
        raise ValueError(
            f"{self.directory}: tensor {name} has shards {per_file}; concatenated along dim "
            f"{' or '.join(map(str, dims))} they do not give {full[name]}, the shape params.json "
            "implies"
        )
