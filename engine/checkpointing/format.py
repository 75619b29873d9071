"""The on-disk format of sharded checkpoints: where each saved tensor sits in the full model.

`engine.checkpointing.protocol` decides *when* and *by whom* files are written; this module
knows *what* a shard is and how shards from any TP/PP/DP layout turn back into full tensors.

A model parameter on one rank is described by a `Placement`:

- ``param``: its name with the global layer number (``layers.5.attention.qkv.weight``), the
  same on every TP rank and whatever the pipeline split;
- ``parts``: the canonical tensors it holds along dim 0 and their full row counts
  (``[(layers.5.attention.q.weight, 512), (…k.weight, 128), (…v.weight, 128)]``; one part
  for an unfused parameter; for the embedding and output head the vocabulary without its
  padding rows);
- ``partition_dim`` / ``partition_sizes`` / ``tp_rank`` / ``tp_size``: how
  `engine.tensor_parallel.sharding.shard_tensor` cut the full tensor (``partition_dim`` is
  None for a replicated parameter);
- ``start`` / ``end``: the range of the flattened local tensor this shard covers (the whole
  tensor for model weights; a slice of it for the distributed optimizer's state).

Every safetensors file holds tensors under ``{state}/{param}/{start}`` (``state`` is ``model``,
``param``, ``exp_avg`` or ``exp_avg_sq``) and, in its header's metadata, the JSON ``index``
mapping each key to its placement. Loading reads the headers, then only the tensors that
hold what the loading rank needs (`ShardReader`), one full parameter at a time.

Placements are derived from the model's parameter inventory (`spec_placement`), for a live
model chunk and for a converter that builds none alike. The RNG states are pickled files of
their own (`engine.checkpointing.rng`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.checkpointing.safetensors_writer import StreamingSafetensorsWriter
from engine.checkpointing.storage import CheckpointError
from engine.models.chunk import inventory_of
from engine.models.inventory import ParameterSpec
from engine.models.weights import global_name
from engine.peft.lora import adapter_spec, is_lora_parameter
from engine.tensor_parallel.sharding import shard_tensor, unshard_tensor

MODEL_STATE = "model"
OPTIMIZER_STATES = ("param", "exp_avg", "exp_avg_sq")


@dataclass
class Placement:
    """Where one rank's tensor sits in the full model (see the module docstring)."""

    param: str
    parts: list[tuple[str, int]]
    partition_dim: int | None
    partition_sizes: list[int]
    tp_rank: int
    tp_size: int
    local_shape: list[int]
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        """Elements of the whole local tensor (not just ``[start, end)``)."""
        return int(torch.Size(self.local_shape).numel())

    def with_range(self, start: int, end: int) -> Placement:
        return Placement(**{**asdict(self), "start": start, "end": end})


def is_tied_copy(module: nn.Module, name: str) -> bool:
    """The last stage's copy of a tied embedding: never saved (the embedding is the original)
    and loaded from it."""
    return inventory_of(module).spec(global_name(module, name)).tied_to is not None


def placement_of(
    module: nn.Module, name: str, param: nn.Parameter, tp_rank: int, tp_size: int
) -> Placement:
    """The placement of ``module``'s parameter ``name`` (one model chunk), from its inventory
    (a LoRA adapter's from its own declaration, `engine.peft.lora.adapter_spec`)."""
    if is_lora_parameter(param):
        spec = adapter_spec(module, name, param)
    else:
        spec = inventory_of(module).spec(global_name(module, name))
    placement = spec_placement(spec, tp_rank, tp_size)
    if placement.local_shape != list(param.shape):
        raise ValueError(
            f"parameter {spec.name} has shape {tuple(param.shape)}; its inventory declares "
            f"{tuple(placement.local_shape)} at TP={tp_size}"
        )
    return placement


def spec_placement(spec: ParameterSpec, tp_rank: int, tp_size: int) -> Placement:
    """Where TP rank ``tp_rank`` of ``tp_size`` holds the parameter ``spec`` declares (a
    concrete spec: global layer numbers). At TP=1 nothing is split, so nothing is recorded
    as split."""
    sharded = spec.tp_dim is not None and tp_size > 1
    local_shape = list(spec.local_shape(tp_size))
    return Placement(
        param=spec.name,
        parts=[(part.name, part.shape[0]) for part in spec.parts],
        partition_dim=spec.tp_dim if sharded else None,
        partition_sizes=list(spec.partition_sizes) if sharded else [],
        tp_rank=tp_rank if sharded else 0,
        tp_size=tp_size if sharded else 1,
        local_shape=local_shape,
        start=0,
        end=math.prod(local_shape),
    )


# From full to local and back ---------------------------------------------------------------


def local_from_canonical(
    placement: Placement, canonical: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """This rank's tensor for ``placement``, from full canonical tensors given by name:
    concatenate the fused parts, pad the vocabulary, take this TP rank's shard."""
    full = torch.cat([canonical(name) for name, _ in placement.parts], dim=0)
    full_rows = placement.local_shape[0]
    if placement.partition_dim == 0:
        full_rows = sum(placement.partition_sizes)
    if full.size(0) < full_rows:  # vocabulary padding rows: zero, as the model initialises them
        full = torch.cat([full, full.new_zeros(full_rows - full.size(0), *full.shape[1:])])
    if placement.partition_dim is not None:
        full = shard_tensor(
            full, placement.partition_dim, placement.partition_sizes, placement.tp_rank,
            placement.tp_size,
        )  # fmt: skip
    if list(full.shape) != placement.local_shape:
        raise ValueError(
            f"tensor {placement.param}: the checkpoint gives shape {tuple(full.shape)} on this "
            f"rank, the model expects {tuple(placement.local_shape)}"
        )
    return full


def unshard(local_tensors: list[torch.Tensor], placement: Placement) -> torch.Tensor:
    """The full tensor from every TP rank's local tensor (rank order); the inverse of
    `shard_tensor`, without communication."""
    if placement.partition_dim is None:
        return local_tensors[0]
    return unshard_tensor(local_tensors, placement.partition_dim, placement.partition_sizes)


def split_canonical(full: torch.Tensor, placement: Placement) -> dict[str, torch.Tensor]:
    """The canonical tensors a full (fused, padded) parameter holds; padding dropped."""
    names, rows = zip(*placement.parts, strict=True)
    pieces = full[: sum(rows)].split(list(rows), dim=0)
    return dict(zip(names, pieces, strict=True))


# Files -------------------------------------------------------------------------------------


def save_shards(path: Path, tensors: dict[str, tuple[torch.Tensor, Placement]]) -> dict[str, Any]:
    """Write ``{key: (tensor, placement)}`` to a safetensors file whose header holds the
    index (key -> placement as JSON), fsynced; return its checksum record
    (`engine.checkpointing.integrity`). Written one tensor at a time, straight from the
    tensors given (views into the DDP buffers included): no copy of the whole shard."""
    index = {key: asdict(p) for key, (_, p) in tensors.items()}
    specs = [(key, t.dtype, tuple(t.shape)) for key, (t, _) in tensors.items()]
    writer = StreamingSafetensorsWriter(path, specs, {"index": json.dumps(index)})
    try:
        for key, (tensor, _) in tensors.items():
            writer.write(key, tensor)
    finally:
        writer.close()
    return writer.checksum()


def read_header(path: Path) -> dict[str, Placement]:
    """The index (key -> placement) of a shard file, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "index" not in header:
            raise ValueError("its header has no index")
        index = {}
        for key, entry in json.loads(header["index"]).items():
            entry["parts"] = [tuple(part) for part in entry["parts"]]
            index[key] = Placement(**entry)
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint shard file: {error}") from error
    return index


# Reading shards back -----------------------------------------------------------------------


@dataclass
class _Entry:
    path: Path
    key: str
    placement: Placement


class ShardReader:
    """Full canonical tensors of one state (``model``, ``param``, ``exp_avg`` or
    ``exp_avg_sq``) from shard files saved under any layout.

    Only headers are read up front. ``canonical(name)`` reads the shards of the one saved
    parameter that holds ``name`` (every TP rank's, every DP slice), assembles it, and keeps it
    until another parameter is asked for, so the parts of a fused parameter are read once.

    Args:
        headers: ``{path: index}`` of the shard files (from `read_header`).
        state: which state to read.
        aliases: canonical name -> name to read instead (the tied output head).
    """

    def __init__(
        self, headers: Mapping[Path, dict[str, Placement]], state: str,
        aliases: Mapping[str, str] | None = None,
    ):  # fmt: skip
        self.state = state
        self.aliases = dict(aliases or {})
        self._entries: dict[str, list[_Entry]] = {}
        self._holder: dict[str, str] = {}  # canonical name -> saved parameter name
        for path, index in headers.items():
            for key, placement in index.items():
                if key.split("/", 1)[0] != state:
                    continue
                self._entries.setdefault(placement.param, []).append(_Entry(path, key, placement))
                for name, _ in placement.parts:
                    self._holder[name] = placement.param
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None
        self._open: dict[Path, Any] = {}  # files opened so far (memory-mapped, header parsed once)

    def names(self) -> list[str]:
        """Every canonical tensor the files hold for this state."""
        return list(self._holder)

    def problem(self, name: str) -> str | None:
        """Why ``canonical(name)`` would fail (a missing tensor, TP rank or DP slice), from the
        headers alone; None when every shard is there."""
        name = self.aliases.get(name, name)
        if name not in self._holder:
            return f"tensor {name} ({self.state}) is not in the checkpoint"
        param = self._holder[name]
        entries = self._entries[param]
        tp_size = entries[0].placement.tp_size
        covered = dict.fromkeys(range(tp_size), 0)
        for entry in entries:
            covered[entry.placement.tp_rank] += entry.placement.end - entry.placement.start
        numel = entries[0].placement.numel
        short = {rank: n for rank, n in covered.items() if n != numel}
        if short:
            return (
                f"partial checkpoint: the shards of {param} ({self.state}) cover "
                + ", ".join(f"{n} of {numel} elements on TP rank {r}" for r, n in short.items())
                + f" in {entries[0].path.parent}"
            )
        return None

    def local(self, placement: Placement) -> torch.Tensor:
        """This rank's tensor for ``placement``. When the checkpoint cut this parameter the
        same way (same TP size and fusion: the usual resume), straight from the saved shards
        of the same TP rank, padding rows included; otherwise rebuilt from the full canonical
        tensors (`local_from_canonical`)."""
        same = self._same_cut_entries(placement)
        if same:
            return self._read_local(same)
        return local_from_canonical(placement, self.canonical)

    def files_for(self, placement: Placement) -> set[Path]:
        """The files `local` reads for ``placement`` (to verify them first)."""
        same = self._same_cut_entries(placement)
        if same:
            return {entry.path for entry in same}
        params = {self._holder.get(self.aliases.get(name, name)) for name, _ in placement.parts}
        return {entry.path for param in params if param for entry in self._entries[param]}

    def _same_cut_entries(self, placement: Placement) -> list[_Entry]:
        """The saved slices that make up exactly this rank's tensor, or [] when the
        checkpoint cut this parameter otherwise."""
        same = [
            entry
            for entry in self._entries.get(placement.param, [])
            if _same_cut(entry.placement, placement)
        ]
        if sum(e.placement.end - e.placement.start for e in same) == placement.numel:
            return same
        return []

    def canonical(self, name: str) -> torch.Tensor:
        """The full canonical tensor ``name`` (float as saved, on the CPU)."""
        problem = self.problem(name)
        if problem is not None:
            raise ValueError(problem)
        name = self.aliases.get(name, name)
        param = self._holder[name]
        if self._cached is None or self._cached[0] != param:
            self._cached = None  # free the previous parameter before reading the next
            self._cached = (param, self._read_param(param))
        return self._cached[1][name]

    def _read_param(self, param: str) -> dict[str, torch.Tensor]:
        entries = self._entries[param]
        placement = entries[0].placement
        by_rank: dict[int, list[_Entry]] = {}
        for entry in entries:
            by_rank.setdefault(entry.placement.tp_rank, []).append(entry)
        locals_ = [self._read_local(by_rank[r]) for r in range(placement.tp_size)]
        return split_canonical(unshard(locals_, placement), placement)

    def _read_local(self, entries: list[_Entry]) -> torch.Tensor:
        """One TP rank's whole local tensor, from its slices (several with the distributed
        optimizer, one otherwise)."""
        placement = entries[0].placement
        if len(entries) == 1 and placement.start == 0 and placement.end == placement.numel:
            return self._read_tensor(entries[0]).view(placement.local_shape)
        tensors = [self._read_tensor(entry).reshape(-1) for entry in entries]
        flat = tensors[0].new_zeros(placement.numel)  # coverage was checked by `problem`
        for entry, tensor in zip(entries, tensors, strict=True):
            flat[entry.placement.start : entry.placement.end] = tensor
        return flat.view(placement.local_shape)

    def _read_tensor(self, entry: _Entry) -> torch.Tensor:
        try:
            if entry.path not in self._open:
                self._open[entry.path] = safe_open(str(entry.path), framework="pt")
            return self._open[entry.path].get_tensor(entry.key)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{entry.path}: cannot read {entry.key}: {error}") from error


def _same_cut(saved: Placement, wanted: Placement) -> bool:
    """The saved shard is exactly (part of) the tensor this rank wants."""
    return all(
        getattr(saved, field) == getattr(wanted, field)
        for field in ("parts", "partition_dim", "partition_sizes", "tp_rank", "tp_size")
    ) and list(saved.local_shape) == list(wanted.local_shape)


class LazyLocalState(Mapping[str, dict[str, torch.Tensor]]):
    """``{optimizer parameter name: {state: this rank's tensor}}`` built on access, so an
    optimizer's ``load_full_state_dict`` holds one parameter's state at a time."""

    def __init__(self, placements: dict[str, Placement], readers: dict[str, ShardReader]):
        self.placements, self.readers = placements, readers

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        placement = self.placements[name]
        return {state: reader.local(placement) for state, reader in self.readers.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.placements)

    def __len__(self) -> int:
        return len(self.placements)
