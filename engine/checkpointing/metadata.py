"""``metadata.json``: what a checkpoint records about itself (iteration, data position, layout,
configs, scheduler, loss scaler, versions, file list), finding a complete checkpoint, and
checking that it fits the model that loads it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.distributed as dist
from torch import nn

import engine
from engine import parallel_state
from engine.checkpointing.storage import (
    LATEST_FILE,
    CheckpointError,
    iteration_dir,
    read_latest_iteration,
)
from engine.models.chunk import config_of
from engine.models.config import ModelConfig
from engine.models.families import family_of
from engine.wrappers import unwrap

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


def metadata_record(
    iteration: int,
    consumed_samples: int,
    layout: dict[str, int | None],
    model: dict[str, Any],
    config: dict[str, Any],
    files: list[str],
    *,
    use_distributed_optimizer: bool = False,
    has_optimizer_state: bool = False,
    lr_scheduler: dict[str, Any] | None = None,
    optimizer_step: int = 0,
    grad_scaler: dict[str, Any] | None = None,
    skipped_steps: int = 0,
    checksums: dict[str, Any] | None = None,
    lora_adapters: bool = False,
) -> dict[str, Any]:
    """The contents of ``metadata.json`` (the defaults: a weights-only checkpoint, as
    conversion writes). ``checksums``: every file's, as
    `engine.checkpointing.integrity.checksums_record` gives them (None: not recorded)."""
    record = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "layout": layout,
        "use_distributed_optimizer": use_distributed_optimizer,
        "has_optimizer_state": has_optimizer_state,
        "lora_adapters": lora_adapters,
        "model": model,
        "config": config,
        "lr_scheduler": lr_scheduler,
        "optimizer_step": optimizer_step,
        "grad_scaler": grad_scaler,
        "skipped_steps": skipped_steps,
        "files": files,
        "versions": {
            "engine": engine.__version__,
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "saved_at_unix_s": time.time(),
    }
    if checksums is not None:
        record["checksums"] = checksums
    return record


def config_record(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (dtypes and anything else as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=jsonable))


def jsonable(value: Any) -> Any:
    """JSON for configs: dataclasses as dicts, dtypes and anything else as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def layout_record() -> dict[str, int | None]:
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": (
            parallel_state.get_virtual_pipeline_model_parallel_world_size()
        ),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "context_parallel_size": parallel_state.get_context_parallel_world_size(),
    }


def open_checkpoint(load_dir: str | Path, iteration: int | None = None) -> tuple[Path, dict]:
    """The directory and metadata of a complete checkpoint (the latest by default)."""
    load_dir = Path(load_dir)
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
        if iteration is None:
            raise CheckpointError(
                f"no checkpoint in {load_dir}: {load_dir / LATEST_FILE} does not exist; "
                "check --load (or start without it)"
            )
    directory = iteration_dir(load_dir, iteration)
    path = directory / METADATA_FILE
    if not path.exists():
        raise CheckpointError(
            f"incomplete checkpoint: {path} does not exist (the save of iteration {iteration} "
            "did not finish); check --load / --ckpt-step"
        )
    metadata = read_metadata(directory)
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {metadata['format_version']}, newer than this "
            f"engine's {FORMAT_VERSION}: upgrade the engine"
        )
    missing = [f for f in metadata["files"] if not (directory / f).exists()]
    if missing:
        raise CheckpointError(
            f"partial checkpoint {directory}: {len(missing)} file(s) listed in {METADATA_FILE} "
            f"are missing, e.g. {missing[0]}"
        )
    return directory, metadata


def checkpoint_digest(load_dir: str | Path, iteration: int | None = None) -> str:
    """SHA-256 of a checkpoint's ``metadata.json``, which holds every file's checksums: the
    identity a LoRA checkpoint records of its base."""
    directory, _ = open_checkpoint(load_dir, iteration)
    return hashlib.sha256((directory / METADATA_FILE).read_bytes()).hexdigest()


def read_metadata(directory: Path) -> dict[str, Any]:
    """``directory/metadata.json``, parsed; `CheckpointError` naming it when it is corrupt."""
    path = directory / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
        if not isinstance(metadata, dict) or not isinstance(metadata.get("files"), list):
            raise ValueError("no list of files")
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        message = f"{path} is corrupt (not a checkpoint's metadata): {error}"
        raise CheckpointError(message) from error
    return metadata


def check_architecture(
    metadata: dict[str, Any], model_chunks: Sequence[nn.Module], directory: Path
) -> None:
    """Raise `CheckpointError` when the checkpoint's parameters (its recorded configuration's
    inventory) differ from the model's, naming every architecture field that differs (the
    family's ``architecture_flags``), or else the tensors."""
    mine_config = config_of(unwrap(model_chunks[0]))
    saved_config = ModelConfig.from_dict(metadata["model"])
    if saved_config.family != mine_config.family:  # another model altogether: say which
        raise CheckpointError(
            f"checkpoint {directory / METADATA_FILE} holds model {saved_config.family!r} "
            f"({saved_config.num_layers} layers, hidden {saved_config.hidden_size}); this run "
            f"builds {mine_config.family!r}"
        )
    saved = saved_config.inventory().canonical_shapes()
    mine = mine_config.inventory().canonical_shapes()
    if saved == mine:
        return
    saved_fields, mine_fields = dataclasses.asdict(saved_config), config_record(mine_config)
    flags = family_of(mine_config).architecture_flags
    diffs = [
        f"{field.replace('_', ' ')} {saved_fields[field]} in the checkpoint vs "
        f"{mine_fields[field]} in the model ({flag})"
        for field, flag in flags.items()
        if saved_fields[field] != mine_fields[field]
    ]
    if not diffs:
        diffs = [
            f"tensor {name}: {saved.get(name, 'absent')} in the checkpoint vs "
            f"{mine.get(name, 'absent')} in the model"
            for name in sorted(set(saved) | set(mine))
            if saved.get(name) != mine.get(name)
        ][:5]
    raise CheckpointError(
        f"checkpoint {directory / METADATA_FILE} does not fit the model: " + "; ".join(diffs)
    )
