"""What one rank saves, taken at one instant (`take_snapshot`), and writing it (`write_snapshot`).

A save is split in two so that it can run in the background (`engine.checkpointing.async_save`):
the snapshot is everything this rank's files and ``metadata.json`` will hold (tensors,
RNG streams, the scheduler's and loss scaler's state, the model's configuration), and writing
it needs neither the model nor any collective. A synchronous save writes straight from the
live tensors; an asynchronous one copies them to host memory first (``copy=True``), because
training goes on updating the parameters in place while the files are being written.

Who writes what: DP rank 0 of each (TP, PP) coordinate writes the weights (replicated over DP;
TP-replicated parameters on TP rank 0 only, never the tied head's copy), or under FSDP2 every
DP rank its rows of them (each with its range of the parameter, as optimizer shards are); the
ranks that own optimizer state write it (every DP rank with the distributed optimizer or
FSDP2, DP rank 0 without); every rank writes its RNG streams.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import parallel_state
from engine.checkpointing.format import (
    MODEL_STATE,
    OPTIMIZER_STATES,
    Placement,
    is_tied_copy,
    placement_of,
    save_shards,
)
from engine.checkpointing.integrity import first_non_finite
from engine.checkpointing.metadata import config_record, layout_record
from engine.checkpointing.rng import rng_state, save_pickle
from engine.distributed.fsdp import is_fully_sharded, local_rows
from engine.models.chunk import config_of
from engine.optimizer.lr_schedule import OptimizerParamScheduler
from engine.optimizer.optimizer import MixedPrecisionOptimizer
from engine.peft import is_lora_parameter
from engine.wrappers import unwrap

Shards = dict[str, tuple[torch.Tensor, Placement]]


@dataclass
class RankSnapshot:
    """One rank's part of a checkpoint, as of the iteration being saved."""

    shards: dict[str, Shards]
    """File name -> the shard tensors (with their placements) it holds."""
    pickles: dict[str, Any]
    """File name -> the (small) object pickled into it: the RNG streams."""
    optimizer_meta: dict[str, Any]
    """Step count, loss scaler and skipped steps (empty when this rank holds no optimizer
    state to save)."""
    lr_scheduler: dict[str, Any] | None
    model_config: dict[str, Any]
    layout: dict[str, int | None]
    use_distributed_optimizer: bool
    has_optimizer_state: bool
    lora_adapters: bool = False
    """The model state is the LoRA adapters (the frozen base is another checkpoint's)."""

    def nbytes(self) -> int:
        """Bytes of tensor data this rank writes."""
        tensors = [t for shard in self.shards.values() for t, _ in shard.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class WrittenFiles:
    """What writing a snapshot produced, gathered by rank 0 for ``metadata.json``."""

    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)
    """File name -> checksum record (`engine.checkpointing.integrity`)."""
    non_finite: str | None = None
    """The first tensor (``{state}/{param}/{start}`` in its file) holding a NaN or inf."""
    optimizer_step: int = 0


def take_snapshot(
    model_chunks: Sequence[nn.Module],
    optimizer: MixedPrecisionOptimizer | None,
    lr_scheduler: OptimizerParamScheduler | None,
    copy_to_host: bool,
    save_rng: bool = True,
) -> RankSnapshot:
    """This rank's state to save. ``copy_to_host``: tensors are copies in CPU memory that the
    snapshot owns (``.to("cpu", copy=True)``, from whatever device they are on), so the live
    ones may change while it is written; otherwise they are the live tensors (or views).
    ``save_rng=False`` leaves the RNG streams out (``--no-save-rng``)."""
    tp, pp, dp = coordinates()
    own = (lambda t: t.detach().to("cpu", copy=True)) if copy_to_host else (lambda t: t.detach())
    shards: dict[str, Shards] = {}
    optimizer_meta: dict[str, Any] = {}
    adapters = has_adapters(model_chunks)
    fully_sharded = any(is_fully_sharded(p) for chunk in model_chunks for p in chunk.parameters())
    if dp == 0 or fully_sharded:  # weights are replicated over DP, or FSDP2 splits them
        weights = model_tensors(model_chunks, tp, adapters)
        model = {k: (own(t), p) for k, (t, p) in weights.items()}
        suffix = f"_dp{dp:02d}" if fully_sharded else ""
        shards[f"model_tp{tp:02d}_pp{pp:02d}{suffix}.safetensors"] = model
    distributed = optimizer is not None and optimizer.shards_over_data_parallel
    if optimizer is not None and (distributed or dp == 0):
        tensors, optimizer_meta = optimizer_tensors(model_chunks, optimizer, tp)
        # `local_state_dict` already cloned them (on their device): only bring them to the host.
        tensors = {k: (t.to("cpu") if copy_to_host else t, p) for k, (t, p) in tensors.items()}
        shards[f"optim_tp{tp:02d}_pp{pp:02d}_dp{dp:02d}.safetensors"] = tensors
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return RankSnapshot(
        shards=shards,
        pickles={f"rng_rank{rank:05d}.pt": rng_state()} if save_rng else {},
        optimizer_meta=copy.deepcopy(optimizer_meta),
        lr_scheduler=None if lr_scheduler is None else copy.deepcopy(lr_scheduler.state_dict()),
        model_config=config_record(config_of(unwrap(model_chunks[0]))),
        layout=layout_record(),
        use_distributed_optimizer=distributed,
        has_optimizer_state=optimizer is not None,
        lora_adapters=adapters,
    )


def write_snapshot(tmp: Path, snapshot: RankSnapshot) -> WrittenFiles:
    """Write this rank's files into ``tmp`` (each fsynced), checking that every tensor is
    finite; no collective, so it may run on a background thread."""
    out = WrittenFiles(optimizer_step=snapshot.optimizer_meta.get("step", 0))
    for name, tensors in snapshot.shards.items():
        if out.non_finite is None:
            bad = first_non_finite((key, t) for key, (t, _) in tensors.items())
            out.non_finite = None if bad is None else f"{bad} in {name}"
        out.checksums[name] = save_shards(tmp / name, tensors)
    for name, obj in snapshot.pickles.items():
        out.checksums[name] = save_pickle(tmp / name, obj)
    return out


# What this rank saves ------------------------------------------------------------------------


def model_tensors(model_chunks: Sequence[nn.Module], tp: int, adapters: bool = False) -> Shards:
    """This rank's weights to save: TP-sharded ones on every TP rank, replicated ones on TP
    rank 0 only, never the tied output head's copy; ``adapters``: the LoRA adapters only.
    An FSDP2 parameter gives this rank's rows, with their range."""
    out = {}
    for placement, param in placements(model_chunks, adapters=adapters):
        if placement.partition_dim is None and tp != 0:
            continue
        if is_fully_sharded(param):
            rows, start, end = local_rows(param)
            if start < end:
                out[f"{MODEL_STATE}/{placement.param}/{start}"] = (
                    rows,
                    placement.with_range(start, end),
                )
            continue
        out[f"{MODEL_STATE}/{placement.param}/0"] = (param.detach(), placement)
    return out


def optimizer_tensors(
    model_chunks: Sequence[nn.Module], optimizer: MixedPrecisionOptimizer, tp: int
) -> tuple[Shards, dict[str, Any]]:
    """The optimizer state this rank owns, each shard with its place; and the step count,
    loss scaler and skipped steps."""
    local = optimizer.local_state_dict()
    where = optimizer_placements(model_chunks, optimizer)
    out = {}
    for shard in local["shards"]:
        placement, tied_copy = where[shard["name"]]
        if tied_copy or (placement.partition_dim is None and tp != 0):
            continue  # the tied head's copy, or a TP-replicated parameter saved by TP rank 0
        ranged = placement.with_range(shard["start"], shard["end"])
        for state in OPTIMIZER_STATES:
            out[f"{state}/{placement.param}/{shard['start']}"] = (shard[state], ranged)
    meta = {k: local[k] for k in ("step", "grad_scaler", "skipped_steps")}
    return out, meta


def has_adapters(model_chunks: Sequence[nn.Module]) -> bool:
    """The chunks carry LoRA adapters: their checkpoints hold the adapters, not the base."""
    return any(is_lora_parameter(p) for chunk in model_chunks for p in chunk.parameters())


def placements(
    model_chunks: Sequence[nn.Module], with_tied_copy: bool = False, adapters: bool = False
) -> list[tuple[Placement, nn.Parameter]]:
    """(placement, parameter) of every parameter of this rank, the tied head's copy (saved
    never, loaded from the embedding) only ``with_tied_copy``; ``adapters``: the LoRA
    adapters only, else the model's own parameters only (the frozen base)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    out = []
    for chunk in model_chunks:
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            if is_lora_parameter(param) != adapters:
                continue
            if adapters or with_tied_copy or not is_tied_copy(module, name):
                out.append((placement_of(module, name, param, tp_rank, tp_size), param))
    return out


def optimizer_placements(
    model_chunks: Sequence[nn.Module], optimizer: MixedPrecisionOptimizer
) -> dict[str, tuple[Placement, bool]]:
    """The optimizer's parameter names -> (placement, is the tied head's copy)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    owner = {}
    for chunk in model_chunks:
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            owner[id(param)] = (module, name)
    out = {}
    for opt_name, param in optimizer.named_parameters():
        module, name = owner[id(param)]
        placement = placement_of(module, name, param, tp_rank, tp_size)
        out[opt_name] = (placement, not is_lora_parameter(param) and is_tied_copy(module, name))
    return out


def coordinates() -> tuple[int, int, int]:
    """This rank's (TP, PP, DP x CP) ranks: context-parallel ranks hold the same weights as
    their data-parallel peers, and the distributed optimizer shards over both."""
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )
