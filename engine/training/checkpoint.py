"""The trainer's side of checkpoints: what a run saves and restores, through
`engine.checkpointing.protocol` (which owns the format, the atomic writes and resharding).

Saved: the model chunks, the optimizer (main parameters, Adam moments, loss scaler, skipped
steps), the LR schedule, the iteration, ``consumed_samples`` (the data position), every RNG
stream and the job's configuration. Restored at ``--load``: all of it, so the run continues
bit for bit (RNG streams only under the same layout, since they are per rank); with
``--finetune``, or on `engine.training.loop.finetune`'s first start, the weights only.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from engine import checkpointing
from engine.training.state import TrainingRun

logger = logging.getLogger(__name__)


def save(run: TrainingRun) -> str | None:
    """Save ``run`` at its current iteration into ``--save`` (collective); return the
    checkpoint's directory, or None when the state was not finite and so was not saved (an
    error is logged; the previous checkpoint stays the latest, and ``--keep-last-n`` deleted
    nothing)."""
    config = run.job.checkpoint
    assert config.save is not None, "the loop saves only with --save"
    try:
        path = checkpointing.save_checkpoint(
            config.save,
            run.iteration,
            run.chunks,
            None if config.no_save_optim else run.optimizer,
            run.scheduler,
            run.consumed_samples,
            config_dict=dataclasses.asdict(run.job),
            keep_last_n=config.keep_last_n,
        )
    except checkpointing.NonFiniteStateError as error:
        _log_not_saved(run, error)
        return None
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
