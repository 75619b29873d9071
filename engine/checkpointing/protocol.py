"""Sharded, atomic checkpoints that load under any TP / PP / DP layout.

API (every rank calls both, collectively)::

    save_checkpoint(save_dir, iteration, model_chunks, optimizer, lr_scheduler,
                    consumed_samples, config_dict=None, keep_last_n=None) -> Path
    load_checkpoint(load_dir, model_chunks, optimizer=None, lr_scheduler=None,
                    finetune=False, load_rng=True, iteration=None) -> (iteration, consumed_samples)

``model_chunks`` are this rank's model chunks (any family), bare or wrapped in
`DistributedDataParallel`; ``optimizer`` a `MixedPrecisionOptimizer` or `DistributedOptimizer`
(None: save / load the weights only); ``lr_scheduler`` an `OptimizerParamScheduler`.

Layout on disk::

    save_dir/
      latest_checkpointed_iteration.txt   "100", replaced atomically, after the directory
      iter_0000100/
        metadata.json                      iteration, consumed samples, layout, configs,
                                           scheduler, loss scaler, versions, file list
        model_tp00_pp01.safetensors        weights of TP rank 0 / PP rank 1 (DP rank 0 writes)
        optim_tp00_pp01_dp00.safetensors   fp32 main params + Adam moments this rank owns
        rng_rank00002.pt                   torch / tracker / python / numpy RNG of global rank 2

Every tensor in a shard file records its place in the full model (`engine.checkpointing.format`),
so loading reconstructs each full canonical tensor from whichever shards hold it and takes the
loading rank's slice: a checkpoint saved at TP=2 x PP=2 x DP=2 with the distributed optimizer
loads at TP=1 or at TP=2 x DP=4, with or without the distributed optimizer. RNG states are
restored only under the same layout (they are per rank); the rest always.

Crash safety: ranks write into ``iter_0000100.tmp/``; after all have finished (a barrier)
rank 0 writes ``metadata.json``, renames the directory to ``iter_0000100`` and only then
replaces the ``latest`` file; ``keep_last_n`` deletes older directories after that. A save
killed at any point leaves ``latest`` naming a complete checkpoint. A failure on one rank
(a missing shard, a full disk) is raised on every rank, so none waits forever in a collective.

This module is the protocol (who writes and reads what, when); `engine.checkpointing.format` the
shard files and resharding; `engine.checkpointing.storage` the directories and atomic renames.
See docs/checkpointing.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.checkpointing.format import (
    MODEL_STATE,
    OPTIMIZER_STATES,
    LazyLocalState,
    Placement,
    ShardReader,
    is_tied_copy,
    placement_of,
    read_header,
    save_shards,
)
from engine.checkpointing.metadata import (
    METADATA_FILE,
    check_architecture,
    config_record,
    jsonable,
    layout_record,
    metadata_record,
    open_checkpoint,
)
from engine.checkpointing.rng import load_pickle, rng_state, save_pickle, set_rng_state
from engine.checkpointing.storage import (
    LATEST_FILE,
    CheckpointError,
    iteration_dir,
    keep_last,
    publish,
    remove_stale,
    write_text_atomic,
)
from engine.distributed.ddp import DistributedDataParallel
from engine.models.chunk import config_of
from engine.optimizer.lr_schedule import OptimizerParamScheduler
from engine.optimizer.optimizer import MixedPrecisionOptimizer
from engine.wrappers import unwrap

logger = logging.getLogger(__name__)

# Saving -------------------------------------------------------------------------------------


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model_chunks: Sequence[nn.Module],
    optimizer: MixedPrecisionOptimizer | None,
    lr_scheduler: OptimizerParamScheduler | None,
    consumed_samples: int,
    config_dict: dict[str, Any] | None = None,
    keep_last_n: int | None = None,
) -> Path:
    """Save this rank's shards of the model, optimizer and RNG under
    ``save_dir/iter_{iteration:07d}`` (collective over all ranks); returns that directory.

    Args:
        config_dict: the run's configuration, stored as JSON in ``metadata.json`` (dataclasses
            and dtypes are converted; anything else unknown is stored as its ``str``).
        keep_last_n: after the new checkpoint is complete, delete all but the newest n.
    """
    if keep_last_n is not None and keep_last_n < 1:
        raise ValueError(f"--keep-last-n must be at least 1, got {keep_last_n}")
    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = _global_rank()
    with _on_every_rank(f"preparing {tmp}"):
        if rank == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            remove_stale(save_dir)
            tmp.mkdir()
    for chunk in model_chunks:  # distributed optimizer: parameters still being all-gathered
        if isinstance(chunk, DistributedDataParallel):
            chunk.finish_param_sync()
    written: list[str] = []
    optimizer_meta: dict[str, Any] = {}
    with _on_every_rank(f"writing into {tmp}"):  # also the barrier: every rank has written
        written, optimizer_meta = _write_rank_files(tmp, model_chunks, optimizer)
    # A rank whose DP slices are all padding holds no optimizer state and counts no steps,
    # so the step is the maximum.
    gathered = _all_gather_objects((written, optimizer_meta.get("step", 0)))
    with _on_every_rank(f"publishing {final}"):  # the others wait for rank 0 here
        if rank == 0:
            optimizer_meta["step"] = max(step for _, step in gathered)
            metadata = _metadata(
                iteration, consumed_samples, model_chunks, optimizer, optimizer_meta,
                lr_scheduler, config_dict, sorted(f for files, _ in gathered for f in files),
            )  # fmt: skip
            text = json.dumps(metadata, indent=1, default=jsonable)
            write_text_atomic(tmp / METADATA_FILE, text)
            publish(tmp, final)
            write_text_atomic(save_dir / LATEST_FILE, str(iteration))
            if keep_last_n is not None:
                keep_last(save_dir, keep_last_n, iteration)
    return final


def _write_rank_files(
    tmp: Path, model_chunks: Sequence[nn.Module], optimizer: MixedPrecisionOptimizer | None
) -> tuple[list[str], dict[str, Any]]:
    """Write this rank's files; return their names and the optimizer's step, loss scaler and
    skipped steps (empty when this rank saves no optimizer state)."""
    tp, pp, dp = _coordinates()
    written: list[str] = []
    optimizer_meta: dict[str, Any] = {}
    if dp == 0:  # weights are replicated over DP
        name = f"model_tp{tp:02d}_pp{pp:02d}.safetensors"
        save_shards(tmp / name, _model_tensors(model_chunks, tp))
        written.append(name)
    if optimizer is not None and (_is_distributed(optimizer) or dp == 0):
        name = f"optim_tp{tp:02d}_pp{pp:02d}_dp{dp:02d}.safetensors"
        tensors, optimizer_meta = _optimizer_tensors(model_chunks, optimizer, tp)
        save_shards(tmp / name, tensors)
        written.append(name)
    name = f"rng_rank{_global_rank():05d}.pt"
    save_pickle(tmp / name, rng_state())
    written.append(name)
    return written, optimizer_meta


def _model_tensors(
    model_chunks: Sequence[nn.Module], tp: int
) -> dict[str, tuple[torch.Tensor, Placement]]:
    """This rank's weights to save: TP-sharded ones on every TP rank, replicated ones on TP
    rank 0 only, never the tied output head's copy."""
    out = {}
    for placement, param in _placements(model_chunks):
        if placement.partition_dim is None and tp != 0:
            continue
        out[f"{MODEL_STATE}/{placement.param}/0"] = (param.detach(), placement)
    return out


def _optimizer_tensors(
    model_chunks: Sequence[nn.Module], optimizer: MixedPrecisionOptimizer, tp: int
) -> tuple[dict[str, tuple[torch.Tensor, Placement]], dict[str, Any]]:
    """The optimizer state this rank owns, each shard with its place; and the step count,
    loss scaler and skipped steps."""
    local = optimizer.local_state_dict()
    placements = _optimizer_placements(model_chunks, optimizer)
    out = {}
    for shard in local["shards"]:
        placement, tied_copy = placements[shard["name"]]
        if tied_copy or (placement.partition_dim is None and tp != 0):
            continue  # the tied head's copy, or a TP-replicated parameter saved by TP rank 0
        ranged = placement.with_range(shard["start"], shard["end"])
        for state in OPTIMIZER_STATES:
            key = f"{state}/{placement.param}/{shard['start']}"
            out[key] = (shard[state], ranged)
    meta = {k: local[k] for k in ("step", "grad_scaler", "skipped_steps")}
    return out, meta


def _placements(
    model_chunks: Sequence[nn.Module], with_tied_copy: bool = False
) -> list[tuple[Placement, nn.Parameter]]:
    """(placement, parameter) of every parameter of this rank, the tied head's copy (saved
    never, loaded from the embedding) only ``with_tied_copy``."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    out = []
    for chunk in model_chunks:
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            if with_tied_copy or not is_tied_copy(module, name):
                out.append((placement_of(module, name, param, tp_rank, tp_size), param))
    return out


def _optimizer_placements(
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
        out[opt_name] = (placement, is_tied_copy(module, name))
    return out


def _metadata(
    iteration: int,
    consumed_samples: int,
    model_chunks: Sequence[nn.Module],
    optimizer: MixedPrecisionOptimizer | None,
    optimizer_meta: dict[str, Any],
    lr_scheduler: OptimizerParamScheduler | None,
    config_dict: dict[str, Any] | None,
    files: list[str],
) -> dict[str, Any]:
    return metadata_record(
        iteration,
        consumed_samples,
        layout_record(),
        _model_config(model_chunks),
        config_dict or {},
        files,
        use_distributed_optimizer=optimizer is not None and _is_distributed(optimizer),
        has_optimizer_state=optimizer is not None,
        lr_scheduler=None if lr_scheduler is None else lr_scheduler.state_dict(),
        optimizer_step=optimizer_meta.get("step", 0),
        grad_scaler=optimizer_meta.get("grad_scaler"),
        skipped_steps=optimizer_meta.get("skipped_steps", 0),
    )


# Loading ------------------------------------------------------------------------------------


def load_checkpoint(
    load_dir: str | Path,
    model_chunks: Sequence[nn.Module],
    optimizer: MixedPrecisionOptimizer | None = None,
    lr_scheduler: OptimizerParamScheduler | None = None,
    finetune: bool = False,
    load_rng: bool = True,
    iteration: int | None = None,
) -> tuple[int, int]:
    """Load a checkpoint saved under any layout into this rank's chunks (collective).

    Args:
        iteration: which one (default: the iteration in ``latest_checkpointed_iteration.txt``).
        finetune: weights only; the optimizer (if given) keeps its fresh state but its float32
            main parameters follow the loaded weights; returns iteration 0, 0 samples.
        load_rng: restore the RNG streams (only possible under the same layout).

    Returns:
        ``(iteration, consumed_samples)`` to resume from.

    Raises:
        CheckpointError: no checkpoint, an incomplete one, or one whose architecture or
            contents do not fit the model; the message names the mismatch and the file.
    """
    with _on_every_rank(f"opening the checkpoint in {load_dir}"):
        directory, metadata = open_checkpoint(load_dir, iteration)
        check_architecture(metadata, model_chunks, directory)
    # A tied output head's copy (last stage) loads the embedding, which is what was saved.
    tied = {"output_layer.weight": "embedding.weight"} if metadata["model"].get(
        "tie_word_embeddings") else {}  # fmt: skip
    model_reader = ShardReader(_shard_headers(directory, metadata, "model_"), MODEL_STATE, tied)
    placements = _placements(model_chunks, with_tied_copy=True)
    readers = {MODEL_STATE: model_reader}
    if optimizer is not None and not finetune:
        if not metadata.get("has_optimizer_state"):
            raise CheckpointError(
                f"checkpoint {directory} holds no optimizer state: load it with --finetune "
                "(weights only) or without an optimizer (--no-load-optim)"
            )
        optim_files = _shard_headers(directory, metadata, "optim_")
        readers.update({s: ShardReader(optim_files, s, tied) for s in OPTIMIZER_STATES})
    # Which shards are missing is known from the headers: agree on it before any rank starts
    # loading (a rank failing alone would leave the others waiting in the optimizer's gather).
    with _on_every_rank(f"loading {directory}"):
        problems = {
            problem
            for reader in readers.values()
            for placement, _ in placements
            for name, _ in placement.parts
            if (problem := reader.problem(name)) is not None
        }
        if problems:
            raise CheckpointError(f"checkpoint {directory}: " + "; ".join(sorted(problems)))
    with _on_every_rank(f"loading weights from {directory}"), torch.no_grad():
        for placement, param in placements:
            param.copy_(_local(placement, model_reader, directory))
    if finetune:
        if optimizer is not None:
            optimizer.reload_model_params()
        _barrier()
        return 0, 0

    if optimizer is not None:
        _load_optimizer(optimizer, model_chunks, metadata, directory, readers)
    if lr_scheduler is not None and metadata.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(metadata["lr_scheduler"])
    if load_rng:
        _load_rng(metadata, directory)
    _barrier()
    return metadata["iteration"], metadata["consumed_samples"]


def read_full_state(directory: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every full canonical tensor of a checkpoint directory, whatever layout saved it:
    ``{"model": {name: tensor}, "param": …, "exp_avg": …, "exp_avg_sq": …}`` (the optimizer
    entries empty without optimizer state). Single process, no model needed; holds the whole
    model in memory, so meant for conversion tools and tests on models that fit."""
    directory = Path(directory)
    metadata = json.loads((directory / METADATA_FILE).read_text())
    out = {}
    for state, prefix in ((MODEL_STATE, "model_"), *((s, "optim_") for s in OPTIMIZER_STATES)):
        reader = ShardReader(_shard_headers(directory, metadata, prefix), state)
        out[state] = {name: reader.canonical(name).clone() for name in reader.names()}
    return out


def _shard_headers(
    directory: Path, metadata: dict[str, Any], prefix: str
) -> dict[Path, dict[str, Placement]]:
    """The indexes of the checkpoint's shard files whose names start with ``prefix``."""
    paths = [directory / f for f in metadata["files"] if f.startswith(prefix)]
    return {path: read_header(path) for path in paths}


def _local(placement: Placement, reader: ShardReader, directory: Path) -> torch.Tensor:
    """This rank's tensor, with the checkpoint named in any error."""
    try:
        return reader.local(placement)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise CheckpointError(f"checkpoint {directory}: {message}") from error


def _load_optimizer(
    optimizer: MixedPrecisionOptimizer,
    model_chunks: Sequence[nn.Module],
    metadata: dict[str, Any],
    directory: Path,
    readers: dict[str, ShardReader],
) -> None:
    readers = {s: readers[s] for s in OPTIMIZER_STATES}
    # The tied head's copy loads the embedding's state (the readers alias its name).
    placements = {n: p for n, (p, _) in _optimizer_placements(model_chunks, optimizer).items()}
    state = {
        "params": _CheckedLocalState(placements, readers, directory),
        "step": metadata["optimizer_step"],
        "grad_scaler": metadata.get("grad_scaler"),
        "skipped_steps": metadata.get("skipped_steps", 0),
    }
    optimizer.load_full_state_dict(state)


class _CheckedLocalState(LazyLocalState):
    """`LazyLocalState` whose errors name the checkpoint."""

    def __init__(self, placements: dict, readers: dict, directory: Path):
        super().__init__(placements, readers)
        self.directory = directory

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return super().__getitem__(name)
        except (KeyError, ValueError) as error:
            message = error.args[0] if error.args else str(error)
            raise CheckpointError(f"checkpoint {self.directory}: {message}") from error


def _load_rng(metadata: dict[str, Any], directory: Path) -> None:
    saved, mine = metadata["layout"], layout_record()
    name = f"rng_rank{_global_rank():05d}.pt"
    if name not in metadata["files"]:
        # A converted checkpoint (tools/convert_checkpoint.py) holds weights only.
        if _global_rank() == 0:
            logger.warning("RNG states not restored: %s holds none", directory)
        return
    if saved != mine:
        if _global_rank() == 0:
            logger.warning(
                "RNG states not restored: the checkpoint was saved under %s, this run is %s "
                "(per-rank streams only map onto the same layout)", saved, mine,
            )  # fmt: skip
        return
    set_rng_state(load_pickle(directory / name))


# Layout and small helpers -------------------------------------------------------------------


def _coordinates() -> tuple[int, int, int]:
    """This rank's (TP, PP, DP) ranks."""
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )


def _model_config(model_chunks: Sequence[nn.Module]) -> dict[str, Any]:
    """The model's configuration as the metadata records it (plain JSON values)."""
    return config_record(config_of(unwrap(model_chunks[0])))


def _is_distributed(optimizer: MixedPrecisionOptimizer) -> bool:
    # Imported here: the distributed optimizer module imports the DDP machinery.
    from engine.optimizer.distributed_optimizer import DistributedOptimizer

    return isinstance(optimizer, DistributedOptimizer)


@contextlib.contextmanager
def _on_every_rank(what: str) -> Iterator[None]:
    """Run the block on every rank, then raise on every rank if it failed on any: a rank that
    raised alone would leave the others waiting in the next collective forever."""
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    failures = [
        (rank, message)
        for rank, message in enumerate(_all_gather_objects(None if error is None else str(error)))
        if message is not None
    ]
    if not failures:
        return
    if error is not None and isinstance(error, CheckpointError):
        raise error
    rank, message = failures[0]
    raise CheckpointError(
        f"{what} failed on rank {rank} (of {len(failures)}): {message}"
    ) from error


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_gather_objects(value: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
