"""Checks a run makes before its first iteration, so that a problem that would surface at the
first save (after hours, or after the whole run when there is no ``--save-interval``) stops it
at once: ``--save`` must be a writable directory with room for one checkpoint.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from engine.device import default_device
from engine.models.config import ModelConfig

OPTIMIZER_BYTES_PER_PARAMETER = 12
"""float32 main parameter + Adam's two moments, as the optimizer shards store them."""


def checkpoint_bytes(model: ModelConfig, with_optimizer: bool) -> int:
    """Bytes one checkpoint takes on disk, all ranks together: the weights in the model's
    dtype, plus the optimizer state (headers and RNG files are noise at this scale)."""
    parameters = model.num_parameters()
    per_parameter = torch.empty(0, dtype=model.params_dtype).element_size()
    if with_optimizer:
        per_parameter += OPTIMIZER_BYTES_PER_PARAMETER
    return parameters * per_parameter


def save_dir_problem(save: str, needed_bytes: int, rank: int) -> str | None:
    """Why ``save`` cannot take a checkpoint of ``needed_bytes`` (None: it can). Creates the
    directory, as the first save would."""
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write_test.rank{rank}")
        with open(probe, "wb") as file:
            file.write(b"0")
        os.remove(probe)
    except OSError as error:
        return f"--save {save} is not a writable directory: {error.strerror or error}"
    free = shutil.disk_usage(save).free
    if free < needed_bytes:
        return (
            f"--save {save}: {free / 1e9:.2f} GB free, but one checkpoint of this run takes about "
            f"{needed_bytes / 1e9:.2f} GB; free space or point --save elsewhere"
        )
    return None


def check_save_dir(save: str | None, model: ModelConfig, with_optimizer: bool) -> None:
    """Raise ``ValueError`` on every rank when ``--save`` is unusable on any rank (collective:
    node-local disks may differ, and a rank that went on alone would wait in a collective)."""
    if save is None:
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    problem = save_dir_problem(save, checkpoint_bytes(model, with_optimizer), rank)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # On the collective backend's device (NCCL reduces accelerator tensors only).
        flags = torch.tensor([rank if problem else -1], device=default_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        first = int(flags.item())
        if problem is None and first >= 0:
            problem = f"--save {save} is unusable on rank {first} (see its error)"
    if problem is not None:
        raise ValueError(problem)
