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

Crash safety: ranks write into ``iter_0000100.tmp/``; after all have finished (a gather of
their files' checksums) rank 0 writes ``metadata.json``, renames the directory to
``iter_0000100`` and only then replaces the ``latest`` file; ``keep_last_n`` deletes older
directories after that. A save killed at any point leaves ``latest`` naming a complete
checkpoint. A failure on one rank (a missing shard, a full disk, a corrupt file) is raised on
every rank, so none waits forever in a collective.

Integrity (`engine.checkpointing.integrity`): every file's checksum, taken as it is written, is
recorded in ``metadata.json`` and verified before the file is used at load; a save whose
weights or optimizer state hold a NaN or an infinity is never published
(`NonFiniteStateError`). A save is three steps, `begin_save` (collective), writing this rank's
`engine.checkpointing.snapshot` (local) and `finish_save` (collective), so that the middle one
can run on a background thread (`engine.checkpointing.async_save`).

This module is the protocol (who writes and reads what, when); `engine.checkpointing.format` the
shard files and resharding; `engine.checkpointing.storage` the directories and atomic renames.
See docs/checkpointing.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.checkpointing.format import (
    MODEL_STATE,
    OPTIMIZER_STATES,
    LazyLocalState,
    Placement,
    ShardReader,
    read_header,
)
from engine.checkpointing.integrity import (
    FileVerifier,
    NonFiniteStateError,
    checksums_record,
    verify_files,
)
from engine.checkpointing.metadata import (
    METADATA_FILE,
    check_architecture,
    jsonable,
    layout_record,
    metadata_record,
    open_checkpoint,
    read_metadata,
)
from engine.checkpointing.rng import load_pickle, set_rng_state
from engine.checkpointing.snapshot import (
    RankSnapshot,
    WrittenFiles,
    optimizer_placements,
    take_snapshot,
    write_snapshot,
)
from engine.checkpointing.snapshot import placements as snapshot_placements
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
from engine.distributed.fsdp import is_fully_sharded, local_rows
from engine.optimizer.lr_schedule import OptimizerParamScheduler
from engine.optimizer.optimizer import MixedPrecisionOptimizer

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
    save_rng: bool = True,
) -> Path:
    """Save this rank's shards of the model, optimizer and RNG under
    ``save_dir/iter_{iteration:07d}`` (collective over all ranks); returns that directory.

    Args:
        config_dict: the run's configuration, stored as JSON in ``metadata.json`` (dataclasses
            and dtypes are converted; anything else unknown is stored as its ``str``).
        keep_last_n: after the new checkpoint is complete, delete all but the newest n.
        save_rng: also save this rank's RNG streams (``--no-save-rng`` turns it off; a load
            then keeps the streams it has, with a warning).

    Raises:
        NonFiniteStateError: a weight or optimizer tensor held a NaN or an infinity; nothing
            was published (the previous checkpoint is still the latest, none was deleted).
        CheckpointError: writing or publishing failed on some rank (raised on every rank).
    """
    request = begin_save(save_dir, iteration, model_chunks, consumed_samples, config_dict,
                         keep_last_n)  # fmt: skip
    snapshot = take_snapshot(model_chunks, optimizer, lr_scheduler, False, save_rng)
    written, error = write_or_error(request.tmp, snapshot)
    return finish_save(request, snapshot, written, error)


@dataclass
class SaveRequest:
    """One save in progress: where it goes and what ``metadata.json`` records besides the
    snapshot."""

    save_dir: Path
    iteration: int
    consumed_samples: int
    config_dict: dict[str, Any] | None
    keep_last_n: int | None

    @property
    def final(self) -> Path:
        return iteration_dir(self.save_dir, self.iteration)

    @property
    def tmp(self) -> Path:
        """Where the ranks write; published by renaming it to `final`."""
        return self.final.with_name(self.final.name + ".tmp")


def begin_save(
    save_dir: str | Path,
    iteration: int,
    model_chunks: Sequence[nn.Module],
    consumed_samples: int,
    config_dict: dict[str, Any] | None,
    keep_last_n: int | None,
) -> SaveRequest:
    """Collective: rank 0 clears what killed saves left and creates the ``.tmp`` directory;
    the distributed optimizer's parameter all-gather is finished (weights are current)."""
    if keep_last_n is not None and keep_last_n < 1:
        raise ValueError(f"--keep-last-n must be at least 1, got {keep_last_n}")
    request = SaveRequest(Path(save_dir), iteration, consumed_samples, config_dict, keep_last_n)
    with _on_every_rank(f"preparing {request.tmp}"):
        if _global_rank() == 0:
            request.save_dir.mkdir(parents=True, exist_ok=True)
            remove_stale(request.save_dir)
            request.tmp.mkdir()
    for chunk in model_chunks:  # distributed optimizer: parameters still being all-gathered
        if isinstance(chunk, DistributedDataParallel):
            chunk.finish_param_sync()
    return request


def write_or_error(tmp: Path, snapshot: RankSnapshot) -> tuple[WrittenFiles, Exception | None]:
    """`write_snapshot`, with its failure returned (to be raised collectively by
    `finish_save`) rather than raised on this rank alone."""
    try:
        return write_snapshot(tmp, snapshot), None
    except Exception as error:  # noqa: BLE001 - raised on every rank by finish_save
        return WrittenFiles(), error


def finish_save(
    request: SaveRequest, snapshot: RankSnapshot, written: WrittenFiles, error: Exception | None
) -> Path:
    """Collective, once every rank has written (or failed): raise any rank's failure on every
    rank; refuse non-finite state; rank 0 writes ``metadata.json`` with every file's checksum,
    renames the directory into place, replaces ``latest`` and applies ``keep_last_n``."""
    tmp, final, rank = request.tmp, request.final, _global_rank()
    with _on_every_rank(f"writing into {tmp}"):  # also the barrier: every rank has written
        if error is not None:
            raise error
    gathered: list[WrittenFiles] = _all_gather_objects(written)
    non_finite = [(r, w.non_finite) for r, w in enumerate(gathered) if w.non_finite is not None]
    if non_finite:
        with _on_every_rank(f"removing {tmp}"):
            if rank == 0:
                shutil.rmtree(tmp)
        bad_rank, what = non_finite[0]
        raise NonFiniteStateError(
            f"not saved: the checkpoint of iteration {request.iteration} holds NaN or inf, "
            f"first {what} on rank {bad_rank} ({len(non_finite)} rank(s) affected); {tmp} was "
            f"removed and {request.save_dir / LATEST_FILE} is unchanged"
        )
    with _on_every_rank(f"publishing {final}"):  # the others wait for rank 0 here
        if rank == 0:
            checksums = {name: rec for w in gathered for name, rec in w.checksums.items()}
            # A rank whose DP slices are all padding holds no optimizer state and counts no
            # steps, so the step is the maximum.
            step = max(w.optimizer_step for w in gathered)
            metadata = _metadata(request, snapshot, step, checksums)
            text = json.dumps(metadata, indent=1, default=jsonable)
            write_text_atomic(tmp / METADATA_FILE, text)
            publish(tmp, final)
            write_text_atomic(request.save_dir / LATEST_FILE, str(request.iteration))
            if request.keep_last_n is not None:
                keep_last(request.save_dir, request.keep_last_n, request.iteration)
    return final


def _metadata(
    request: SaveRequest, snapshot: RankSnapshot, step: int, checksums: dict[str, Any]
) -> dict[str, Any]:
    meta = snapshot.optimizer_meta
    return metadata_record(
        request.iteration,
        request.consumed_samples,
        snapshot.layout,
        snapshot.model_config,
        request.config_dict or {},
        sorted(checksums),
        use_distributed_optimizer=snapshot.use_distributed_optimizer,
        has_optimizer_state=snapshot.has_optimizer_state,
        lr_scheduler=snapshot.lr_scheduler,
        optimizer_step=step,
        grad_scaler=meta.get("grad_scaler"),
        skipped_steps=meta.get("skipped_steps", 0),
        checksums=checksums_record(checksums),
        lora_adapters=snapshot.lora_adapters,
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
    *,
    verify: bool = True,
    adapters: bool | None = None,
) -> tuple[int, int]:
    """Load a checkpoint saved under any layout into this rank's chunks (collective).

    Args:
        iteration: which one (default: the iteration in ``latest_checkpointed_iteration.txt``).
        finetune: weights only; the optimizer (if given) keeps its fresh state but its float32
            main parameters follow the loaded weights; returns iteration 0, 0 samples.
        load_rng: restore the RNG streams (only possible under the same layout).
        verify: check every file this rank reads against the checksums in ``metadata.json``
            before using it. Off only to measure what verifying costs
            (benchmarks/checkpoint_io.py); the trainer always verifies.
        adapters: the checkpoint holds LoRA adapters (a LoRA run's), loaded into the chunks'
            adapters; False: a base model's, loaded into the frozen base. Default: as the
            checkpoint's metadata says.

    Returns:
        ``(iteration, consumed_samples)`` to resume from.

    Raises:
        CheckpointError: no checkpoint, an incomplete one, a corrupt file (checksum, size or
            format), or one whose architecture or contents do not fit the model; the message
            names the mismatch and the file. Raised on every rank.
    """
    with _on_every_rank(f"opening the checkpoint in {load_dir}"):
        directory, metadata = open_checkpoint(load_dir, iteration)
        check_architecture(metadata, model_chunks, directory)
        if optimizer is not None and not finetune and not metadata.get("has_optimizer_state"):
            raise CheckpointError(
                f"checkpoint {directory} holds no optimizer state: load it with --finetune "
                "(weights only) or without an optimizer (--no-load-optim)"
            )
    # A tied output head's copy (last stage) loads the embedding, which is what was saved.
    tied = {"output_layer.weight": "embedding.weight"} if metadata["model"].get(
        "tie_word_embeddings") else {}  # fmt: skip
    saved_adapters = bool(metadata.get("lora_adapters"))
    if adapters is None:
        adapters = saved_adapters
    if adapters != saved_adapters:
        what = "LoRA adapters" if saved_adapters else "a model without adapters"
        raise CheckpointError(
            f"checkpoint {directory} holds {what}; expected "
            f"{'LoRA adapters' if adapters else 'a base model'}"
        )
    placements = snapshot_placements(model_chunks, with_tied_copy=True, adapters=adapters)
    with _on_every_rank(f"reading the shard headers of {directory}"):
        model_files = _shard_headers(directory, metadata, "model_", verify)
        readers = {MODEL_STATE: ShardReader(model_files, MODEL_STATE, tied)}
        if optimizer is not None and not finetune:
            headers = _shard_headers(directory, metadata, "optim_", verify)
            readers.update({s: ShardReader(headers, s, tied) for s in OPTIMIZER_STATES})
    # Which shards are missing is known from the headers: agree on it before any rank starts
    # loading (a rank failing alone would leave the others waiting in the optimizer's gather).
    # Every file this rank will read is then verified in the background, in the order of use,
    # and waited for before its first use: hashing the optimizer's files overlaps with loading
    # the weights.
    verifier = FileVerifier(directory, metadata, warn=_global_rank() == 0, enabled=verify)
    try:
        with _on_every_rank(f"loading {directory}"):
            problems = {
                problem
                for reader in readers.values()
                for placement, _ in placements
                for name, _ in placement.parts
                if (problem := reader.problem(name)) is not None
            }
            if problems:
                if verify:  # an index damaged in a shard's header looks like a missing shard
                    shards = [f for f in metadata["files"] if f.startswith(("model_", "optim_"))]
                    verify_files(directory, shards, metadata, warn=False)
                raise CheckpointError(f"checkpoint {directory}: " + "; ".join(sorted(problems)))
            files = {
                state: sorted({p.name for pl, _ in placements for p in reader.files_for(pl)})
                for state, reader in readers.items()
            }
            optim_names = sorted({f for s in OPTIMIZER_STATES for f in files.get(s, [])})
            rng = None if finetune or not load_rng else _rng_file(metadata, directory)
            verifier.start(files[MODEL_STATE] + optim_names + ([rng.name] if rng else []))
        return _load_verified(
            directory, metadata, model_chunks, optimizer, lr_scheduler, finetune, load_rng,
            readers, placements, verifier, files[MODEL_STATE], optim_names,
        )  # fmt: skip
    finally:
        verifier.close()


def _load_verified(
    directory: Path,
    metadata: dict[str, Any],
    model_chunks: Sequence[nn.Module],
    optimizer: MixedPrecisionOptimizer | None,
    lr_scheduler: OptimizerParamScheduler | None,
    finetune: bool,
    load_rng: bool,
    readers: dict[str, ShardReader],
    placements: list[tuple[Placement, nn.Parameter]],
    verifier: FileVerifier,
    model_files: list[str],
    optim_files: list[str],
) -> tuple[int, int]:
    """`load_checkpoint` once the shards are known to be there: each group of files is
    waited for (verified) before it is used, collectively."""
    with _on_every_rank(f"loading weights from {directory}"), torch.no_grad():
        verifier.wait(model_files)
        for placement, param in placements:
            whole = _local(placement, readers[MODEL_STATE], directory)
            if is_fully_sharded(param):  # FSDP2: this rank's rows of it
                rows, start, end = local_rows(param)
                rows.copy_(whole.reshape(-1)[start:end])
            else:
                param.copy_(whole)
    if finetune:
        if optimizer is not None:
            optimizer.reload_model_params()
        _barrier()
        return 0, 0

    if optimizer is not None:
        with _on_every_rank(f"verifying the optimizer state in {directory}"):
            verifier.wait(optim_files)
        _load_optimizer(optimizer, model_chunks, metadata, directory, readers)
    if lr_scheduler is not None and metadata.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(metadata["lr_scheduler"])
    if load_rng:
        with _on_every_rank(f"loading the RNG states from {directory}"):
            path = _rng_file(metadata, directory, warn=True)
            if path is not None:
                verifier.wait([path.name])
                set_rng_state(load_pickle(path))
    return metadata["iteration"], metadata["consumed_samples"]


def read_full_state(directory: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every full canonical tensor of a checkpoint directory, whatever layout saved it:
    ``{"model": {name: tensor}, "param": …, "exp_avg": …, "exp_avg_sq": …}`` (the optimizer
    entries empty without optimizer state). Single process, no model needed; holds the whole
    model in memory, so meant for conversion tools and tests on models that fit."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    verify_files(directory, metadata["files"], metadata)
    out = {}
    for state, prefix in ((MODEL_STATE, "model_"), *((s, "optim_") for s in OPTIMIZER_STATES)):
        reader = ShardReader(_shard_headers(directory, metadata, prefix), state)
        out[state] = {name: reader.canonical(name).clone() for name in reader.names()}
    return out


def _shard_headers(
    directory: Path, metadata: dict[str, Any], prefix: str, verify: bool = True
) -> dict[Path, dict[str, Placement]]:
    """The indexes of the checkpoint's shard files whose names start with ``prefix``."""
    out = {}
    for name in (f for f in metadata["files"] if f.startswith(prefix)):
        try:
            out[directory / name] = read_header(directory / name)
        except CheckpointError as error:
            if not verify:
                raise
            # Say *why* it does not parse when the checksums can: truncated, or corrupted.
            try:
                verify_files(directory, [name], metadata, warn=False)
            except CheckpointError as corrupt:
                raise corrupt from error
            raise
    return out


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
    placements = {n: p for n, (p, _) in optimizer_placements(model_chunks, optimizer).items()}
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


def _rng_name() -> str:
    return f"rng_rank{_global_rank():05d}.pt"


def _rng_file(metadata: dict[str, Any], directory: Path, warn: bool = False) -> Path | None:
    """This rank's RNG file, when the checkpoint has one for this layout (with the reason
    why not, on rank 0, when ``warn``)."""
    saved, mine = metadata["layout"], layout_record()
    if _rng_name() not in metadata["files"]:
        # A converted checkpoint (tools/convert_checkpoint.py) holds weights only.
        if warn and _global_rank() == 0:
            logger.warning("RNG states not restored: %s holds none", directory)
        return None
    if saved != mine:
        if warn and _global_rank() == 0:
            logger.warning(
                "RNG states not restored: the checkpoint was saved under %s, this run is %s "
                "(per-rank streams only map onto the same layout)", saved, mine,
            )  # fmt: skip
        return None
    return directory / _rng_name()


# Layout and small helpers -------------------------------------------------------------------


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
