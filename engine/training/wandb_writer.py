"""Weights & Biases logging (``--wandb-project``, ``--wandb-exp-name``, ``--wandb-save-dir``,
Megatron-LM's flags): the scalars TensorBoard gets, at the same iterations, plus the job's
configuration as the W&B run's config.

``wandb`` is an optional dependency (``pip install -e '.[wandb]'``), imported only when a run
asks for it. W&B's own environment applies: ``WANDB_MODE=offline`` logs to local files with no
network (``wandb sync`` uploads them later), ``WANDB_SILENT=true`` quiets it::

    WANDB_MODE=offline torchrun ... examples/pretrain.py ... --wandb-project my-project
    wandb leet inspect --summary <save>/wandb/wandb/latest-run   # read it back locally
"""

from __future__ import annotations

import importlib
import os
from typing import Any

INSTALL = "pip install -e '.[wandb]' (or pip install wandb)"
"""What to run when the package is missing."""


def wandb_import_problem() -> str | None:
    """Why ``import wandb`` fails here (with the install command), or None when it works."""
    try:
        importlib.import_module("wandb")
    except ImportError as error:
        return f"needs the wandb package, which does not import ({error}): {INSTALL}"
    return None


def wandb_dir(save_dir: str | None, checkpoint_save: str | None) -> str | None:
    """The directory W&B writes under: ``--wandb-save-dir``, else Megatron's ``<--save>/wandb``,
    else None (W&B's default, the working directory)."""
    if save_dir:
        return save_dir
    return os.path.join(checkpoint_save, "wandb") if checkpoint_save else None


class WandbWriter:
    """A W&B run that receives the logged scalars (a `engine.training.metrics.ScalarSink`),
    created by the one rank that writes them.

    Args:
        project: the W&B project (``--wandb-project``).
        name: the run's name (``--wandb-exp-name``); None lets W&B choose one.
        directory: where W&B writes (see `wandb_dir`); created if missing.
        config: the job's configuration, by section (``job_to_dict``), as the run's config.
    """

    def __init__(
        self, project: str, name: str | None, directory: str | None, config: dict[str, Any]
    ):
        problem = wandb_import_problem()  # validated up front; a clear error if called directly
        if problem is not None:
            raise ImportError(f"--wandb-project {project}: {problem}")
        import wandb

        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=directory, config=config)

    @property
    def directory(self) -> str:
        """The run's own directory (``.../wandb/offline-run-...`` or ``.../run-...``)."""
        return str(self.run.dir).removesuffix("/files")

    def scalars(self, values: dict[str, float], step: int) -> None:
        # W&B merges everything logged at one step into one history row (the training scalars
        # and an evaluation at the same iteration), committed when the step moves on.
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()
