"""The trainer's side of checkpoints: what a run saves and restores, through
`engine.checkpointing.protocol` (which owns the format, the atomic writes and resharding).

Saved: the model chunks, the optimizer (main parameters, Adam moments, loss scaler, skipped
steps), the LR schedule, the iteration, ``consumed_samples`` (the data position), every RNG
stream and the job's configuration. Restored at ``--load``: all of it, so the run continues
bit for bit (RNG streams only under the same layout, since they are per rank); with
``--finetune``, or on `engine.training.loop.finetune`'s first start, the weights only.

With ``--async-save`` the loop calls `save` (which starts a background save, after waiting for
the previous one), `poll` at every iteration boundary and `finish` before it returns; each
gives the directory of a checkpoint it published, so the loop always knows the last good one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from engine import checkpointing
from engine.peft import load_lora_state, read_peft_adapter
from engine.peft.interop import hf_target_modules
from engine.training.state import TrainingRun
from engine.wrappers import unwrap

logger = logging.getLogger(__name__)


def save(run: TrainingRun) -> str | None:
    """Save ``run`` at its current iteration into ``--save`` (collective); return the
    directory of the checkpoint this call published, or None.

    Synchronous: the new checkpoint, or None when the state was not finite and so was not
    saved (an error is logged; the previous checkpoint stays the latest and ``--keep-last-n``
    deleted nothing). With ``--async-save``: first waits for the previous save still in flight
    (only one at a time) and returns its directory (None if there was none, or it was
    refused); the new one is published later, by `poll` or `finish`.
    """
    global _pending
    config = run.job.checkpoint
    assert config.save is not None, "the loop saves only with --save"
    previous = finish(run)
    arguments = (
        config.save,
        run.iteration,
        run.chunks,
        None if config.no_save_optim else run.optimizer,
        run.scheduler,
        run.consumed_samples,
        _config_record(run),
        config.keep_last_n,
        not config.no_save_rng,
    )
    if config.async_save:
        _pending = (run, checkpointing.save_checkpoint_async(*arguments))
        return previous
    try:
        return str(checkpointing.save_checkpoint(*arguments))
    except checkpointing.NonFiniteStateError as error:
        _log_not_saved(run, error)
        return None


def _config_record(run: TrainingRun) -> dict:
    """The job as saved in ``metadata.json``; a LoRA run's also names its frozen base (path
    and `checkpointing.checkpoint_digest`), which its adapters are only valid on."""
    record = dataclasses.asdict(run.job)
    if run.job.lora is not None:
        record["lora_base"] = {
            "path": run.job.checkpoint.pretrained_checkpoint, "digest": run.base_digest,
        }  # fmt: skip
    return record


_pending: tuple[TrainingRun, checkpointing.AsyncSave] | None = None
"""The ``--async-save`` in flight (one at most) and the run it belongs to."""


def _take_pending(run: TrainingRun) -> checkpointing.AsyncSave | None:
    global _pending
    if _pending is not None and _pending[0] is not run:
        # Left by a run that ended with an error before waiting for it: never published.
        _pending[1].abandon()
        _pending = None
    return None if _pending is None else _pending[1]


def poll(run: TrainingRun) -> str | None:
    """At an iteration boundary (collective; one all-reduce, only while an ``--async-save`` is
    in flight): publish it if every rank has written it; return its directory, else None."""
    pending = _take_pending(run)
    return None if pending is None else _publish(run, pending.poll)


def finish(run: TrainingRun) -> str | None:
    """Wait for the ``--async-save`` in flight, if any, and publish it (collective); return
    its directory (None: nothing in flight, or it was refused as non-finite)."""
    pending = _take_pending(run)
    return None if pending is None else _publish(run, pending.wait)


def _publish(run: TrainingRun, step: Callable[[], Path | None]) -> str | None:
    """``step`` (the pending save's poll or wait); forget the save once it is published or
    has failed."""
    global _pending
    try:
        path = step()
    except checkpointing.NonFiniteStateError as error:
        _pending = None
        _log_not_saved(run, error)
        return None
    except BaseException:
        _pending = None
        raise
    if path is None:
        return None
    _pending = None
    return str(path)


def _log_not_saved(run: TrainingRun, error: Exception) -> None:
    if run.rank != 0:
        return
    save = run.job.checkpoint.save
    assert save is not None
    latest = checkpointing.read_latest_iteration(save)
    last = "none yet" if latest is None else str(checkpointing.iteration_dir(save, latest))
    logger.error("%s; the last good checkpoint is %s", error, last)


def load(run: TrainingRun, finetuning: bool) -> str | None:
    """Restore ``run`` from ``--load``; return what was loaded (None: nothing to load, also
    when ``--load`` holds no checkpoint yet: a warning, then training from scratch).

    A fine-tuning run that has already saved to ``--save`` resumes from there, fully; its
    first start takes only the weights of ``--load``.
    """
    # `engine.training.state.loads_every_weight` predicts from these rules whether the model
    # could be built uninitialised: keep the two in step.
    if run.job.lora is not None:
        return _load_lora(run)
    config = run.job.checkpoint
    directory, weights_only = config.load, config.finetune
    if finetuning:
        if config.save is not None and checkpointing.read_latest_iteration(config.save) is not None:
            directory, weights_only = config.save, False
        else:
            weights_only = True
    if directory is None:
        return None
    if not weights_only and checkpointing.read_latest_iteration(directory) is None:
        # As Megatron-LM: one command line (--load = --save) serves the first start and every
        # restart. Weights-only loads (fine-tuning) need their checkpoint: those still fail.
        if run.rank == 0:
            logger.warning("no checkpoint in --load %s yet: training from scratch", directory)
        return None
    iteration, consumed = checkpointing.load_checkpoint(
        directory,
        run.chunks,
        None if (config.no_load_optim and not weights_only) else run.optimizer,
        None if weights_only else run.scheduler,
        finetune=weights_only,
        load_rng=not config.no_load_rng,
    )
    if config.no_load_optim and not weights_only:
        run.optimizer.reload_model_params()  # 16-bit models: main params follow the weights
    run.iteration, run.consumed_samples = iteration, consumed
    return str(Path(directory))


def _load_lora(run: TrainingRun) -> str | None:
    """A LoRA run: the frozen base from ``--pretrained-checkpoint`` (weights only), then the
    adapters, their optimizer state and the run's position from ``--load`` when it holds a
    checkpoint, which must have been trained on this very base (its recorded digest)."""
    config = run.job.checkpoint
    loaded = []
    if config.pretrained_checkpoint is not None:
        checkpointing.load_checkpoint(
            config.pretrained_checkpoint, run.chunks, finetune=True, load_rng=False,
            adapters=False,
        )  # fmt: skip
        run.base_digest = checkpointing.checkpoint_digest(config.pretrained_checkpoint)
        loaded.append(f"the base {config.pretrained_checkpoint}")
    directory = config.load
    if directory is None or checkpointing.read_latest_iteration(directory) is None:
        if config.load_peft_adapter is not None:
            _load_peft_adapter(run, config.load_peft_adapter)
            loaded.append(f"the PEFT adapter {config.load_peft_adapter}")
        elif directory is not None and run.rank == 0:
            logger.warning("no checkpoint in --load %s yet: new adapters", directory)
        return ", ".join(loaded) or None
    found, metadata = checkpointing.open_checkpoint(directory)
    base = metadata["config"].get("lora_base") or {}
    if base.get("digest") != run.base_digest:
        recorded = base.get("path") or "a randomly initialised base"
        given = config.pretrained_checkpoint or "none"
        raise checkpointing.CheckpointError(
            f"checkpoint {found} holds LoRA adapters trained on {recorded} (digest "
            f"{base.get('digest')}); this run's --pretrained-checkpoint is {given} (digest "
            f"{run.base_digest}): give the base the adapters were trained on"
        )
    iteration, consumed = checkpointing.load_checkpoint(
        directory,
        run.chunks,
        None if config.no_load_optim else run.optimizer,
        None if config.finetune else run.scheduler,
        finetune=config.finetune,
        load_rng=not config.no_load_rng,
        adapters=True,
    )
    run.iteration, run.consumed_samples = iteration, consumed
    return ", ".join([*loaded, f"the adapters {found}"])


def _load_peft_adapter(run: TrainingRun, directory: str) -> None:
    """Start the adapters from a PEFT adapter directory, which must have been made with the
    run's LoRA settings (rank, alpha, the same modules)."""
    lora = run.job.lora
    assert lora is not None
    try:
        config, tensors = read_peft_adapter(directory)
    except (OSError, ValueError) as error:
        raise checkpointing.CheckpointError(f"--load-peft-adapter {directory}: {error}") from None
    mine = (lora.rank, lora.alpha, sorted(hf_target_modules(lora)))
    theirs = (config.rank, config.alpha, sorted(hf_target_modules(config)))
    if mine != theirs:
        raise checkpointing.CheckpointError(
            f"--load-peft-adapter {directory} has rank {theirs[0]}, alpha {theirs[1]:g} on "
            f"{', '.join(theirs[2])}; this run: --lora-rank {mine[0]}, --lora-alpha "
            f"{mine[1]:g}, --lora-target-modules {','.join(mine[2])}"
        )
    for chunk in run.chunks:
        load_lora_state(unwrap(chunk), tensors)
    run.optimizer.reload_model_params()  # 16-bit adapters: the main copies follow
