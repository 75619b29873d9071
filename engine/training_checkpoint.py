"""The trainer's side of checkpoints: what a run saves and restores, through
`engine.checkpointing` (which owns the format, the atomic writes and resharding).

Saved: the model chunks, the optimizer (main parameters, Adam moments, loss scaler, skipped
steps), the LR schedule, the iteration, ``consumed_samples`` (the data position) and every
RNG stream. Restored at ``--load`` (all of it, so the run continues bit for bit), or, for
``--finetune`` / `engine.training.finetune`'s first run, the weights only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.training import _Run


def save(run: _Run) -> str:
    """Save ``run`` at its current iteration into ``--save``; return the directory."""
    from engine import checkpointing

    run.sync_params()
    return checkpointing.save_checkpoint(
        run.job.checkpoint.save,
        iteration=run.iteration,
        model=run.chunks,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        consumed_samples=run.consumed_samples,
        job=run.job,
    )


def load(run: _Run, finetuning: bool) -> str | None:
    """Restore ``run`` from ``--load`` (None when there is nothing to load).

    A fine-tuning run that has already saved to ``--save`` resumes from there, fully; its
    first start takes only the weights of ``--load``.
    """
    config = run.job.checkpoint
    if config.load is None and not (finetuning and config.save):
        return None
    from engine import checkpointing

    directory, weights_only = config.load, config.finetune
    if finetuning:
        own = config.save is not None and checkpointing.latest_iteration(config.save) is not None
        directory, weights_only = (config.save, False) if own else (config.load, True)
    if directory is None or not os.path.isdir(directory):
        if config.load is not None and not finetuning:
            raise FileNotFoundError(f"--load {config.load}: no such directory")
        return None
    state = checkpointing.load_checkpoint(
        directory,
        model=run.chunks,
        optimizer=None if weights_only or config.no_load_optim else run.optimizer,
        scheduler=None if weights_only else run.scheduler,
        load_rng=not (weights_only or config.no_load_rng),
    )
    if not weights_only:
        run.iteration, run.consumed_samples = state["iteration"], state["consumed_samples"]
    return directory
