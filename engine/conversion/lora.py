"""A LoRA run's checkpoint (adapters only, `engine.training.checkpoint`) out of the engine:
merged into its frozen base as a plain engine checkpoint (which ``engine-to-hf`` exports),
or as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it onto the HF base).

Both build the model once in this process (one rank, TP=1: every tensor whole), load the
base and the adapters through the checkpoint protocol (which reshards any saved layout), and
write from the live model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.checkpointing import (
    checkpoint_digest,
    load_checkpoint,
    open_checkpoint,
    save_checkpoint,
)
from engine.conversion.errors import ConversionError
from engine.device import leave_distributed
from engine.models.build import build_uninitialised
from engine.models.config import ModelConfig
from engine.models.families import family_of
from engine.peft import LoraConfig, apply_lora, merge_lora, save_peft_adapter
from engine.progress import Progress


def _lora_record(adapters_dir: str | Path, iteration: int | None) -> tuple[Path, dict]:
    """The adapters checkpoint's directory and metadata; ConversionError if it holds none."""
    directory, metadata = open_checkpoint(adapters_dir, iteration)
    if not metadata.get("lora_adapters") or not metadata["config"].get("lora"):
        raise ConversionError(f"checkpoint {directory} holds no LoRA adapters")
    return directory, metadata


@contextmanager
def _one_rank() -> Iterator[None]:
    """Model-parallel state of one rank (TP=PP=1) for the duration; a process group of one
    when there is none, destroyed after (the caller's process is left as it was)."""
    created = not dist.is_initialized()
    if created:  # in memory, on the CPU: conversion is one process, whatever the machine
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            leave_distributed(together=False)


def _saved_lora(metadata: dict[str, Any]) -> LoraConfig:
    """The `LoraConfig` a LoRA run's checkpoint records (``dataclasses.asdict`` as JSON)."""
    saved = dict(metadata["config"]["lora"])
    saved["target_modules"] = tuple(saved["target_modules"])
    return LoraConfig(**saved)


def _model_with_adapters(metadata: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    """The checkpoint's model at TP=1 with its adapters attached (fresh weights); the base is
    uninitialised (its weights are loaded, or never read)."""
    config = ModelConfig.from_dict(metadata["model"])
    if dtype is not None:
        config.params_dtype = dtype
    model = build_uninitialised(lambda: family_of(config).model(config))
    apply_lora(model, _saved_lora(metadata))
    return model


def merge_lora_checkpoint(
    adapters_dir: str | Path,
    save_dir: str | Path,
    base_dir: str | Path | None = None,
    iteration: int | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the base with ``B A * alpha / r`` added to every adapted block, as an engine
    checkpoint (TP=1, weights only) under ``save_dir``; returns its directory.

    ``base_dir``: the base (default: the path the adapters' checkpoint records); its digest
    must be the recorded one. ``progress`` counts the steps (base, adapters, merge, save)."""
    directory, metadata = _lora_record(adapters_dir, iteration)
    recorded = metadata["config"].get("lora_base") or {}
    base = base_dir or recorded.get("path")
    if base is None:
        raise ConversionError(
            f"checkpoint {directory} records no base checkpoint (it was trained on a randomly "
            "initialised one): nothing to merge into"
        )
    digest = checkpoint_digest(base)
    if digest != recorded.get("digest"):
        raise ConversionError(
            f"{base} is not the base the adapters in {directory} were trained on (digest "
            f"{digest}, recorded {recorded.get('digest')})"
        )
    step = _steps(progress, ["load base", "load adapters", "merge", "save"])
    with _one_rank():
        model = _model_with_adapters(metadata, dtype)
        step()
        load_checkpoint(base, [model], finetune=True, load_rng=False, adapters=False)
        step()
        load_checkpoint(adapters_dir, [model], finetune=True, load_rng=False,
                        iteration=iteration, adapters=True)  # fmt: skip
        step()
        merge_lora(model)
        step()
        source = {"format": "engine+lora", "path": str(directory), "base": str(base)}
        out = save_checkpoint(
            save_dir, 0, [model], None, None, 0, {"converted_from": source}, save_rng=False
        )
        step()
        return out


def lora_to_peft(
    adapters_dir: str | Path,
    save_dir: str | Path,
    base_model_name_or_path: str | None = None,
    iteration: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the adapters of an engine LoRA checkpoint as a PEFT adapter directory; returns
    ``save_dir``. The base is not read: PEFT's files hold the adapters alone. ``progress``
    counts the steps (adapters, save)."""
    directory, metadata = _lora_record(adapters_dir, iteration)
    step = _steps(progress, ["load adapters", "save"])
    with _one_rank():
        model = _model_with_adapters(metadata, None)
        step()
        load_checkpoint(adapters_dir, [model], finetune=True, load_rng=False,
                        iteration=iteration, adapters=True)  # fmt: skip
        step()
        save_peft_adapter([model], save_dir, _saved_lora(metadata), base_model_name_or_path)
        step()
        return Path(save_dir)


def _steps(progress: Progress | None, names: list[str]) -> Callable[[], None]:
    """A function to call before each of ``names`` and after the last: it shows the step
    starting (or done) on ``progress``, whose total is the number of steps."""
    if progress is None:
        return lambda: None
    progress.set_total(len(names))
    done = iter(range(len(names) + 1))

    def step() -> None:
        count = next(done)
        now = names[count] if count < len(names) else "done"
        progress.update(count, fields={"step": now}, force=True)

    return step
