"""Weights-only engine checkpoints written from canonical tensors, one parameter at a time.

The result is exactly what `engine.checkpointing.save_checkpoint` writes at the target layout
(TP x PP, DP=1, no optimizer state, iteration 0): one ``model_tp{t}_pp{p}`` file per rank whose
index holds the same `Placement` records a live model would produce, derived from the model's
parameter inventory without building the model (`stage_placements`), so `load_checkpoint`
reads it at any layout.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.checkpointing.format import MODEL_STATE, Placement, local_from_canonical, spec_placement
from engine.checkpointing.integrity import checksums_record
from engine.checkpointing.metadata import METADATA_FILE, config_record, metadata_record
from engine.checkpointing.safetensors_writer import StreamingSafetensorsWriter
from engine.checkpointing.storage import LATEST_FILE, iteration_dir, publish, write_text_atomic
from engine.conversion.errors import ConversionError
from engine.models.config import ModelConfig


def stage_placements(config: ModelConfig, tp_size: int, pp_size: int) -> list[list[Placement]]:
    """For each pipeline stage, the placements (at TP rank 0) of the parameters
    `engine.checkpointing.save_checkpoint` writes, in the model's parameter order (from the
    inventory, as for a live model); ``with_tp_rank`` gives another TP rank's."""
    inventory = config.inventory(tp_size)
    stages = config.virtual_stage_layers(pp_size)
    return [
        [
            spec_placement(spec, 0, tp_size)
            for spec in inventory.stage_specs(layers, stage == 0, stage == pp_size - 1, False)
        ]
        for stage, layers in enumerate(stages)
    ]


def with_tp_rank(placement: Placement, tp_rank: int) -> Placement:
    """The same placement on another TP rank (replicated ones stay on rank 0)."""
    if placement.partition_dim is None:
        return placement
    return dataclasses.replace(placement, tp_rank=tp_rank)


def write_engine_checkpoint(
    save_dir: str | Path,
    config: ModelConfig,
    canonical: Callable[[str], torch.Tensor],
    tp_size: int,
    pp_size: int,
    dtype: torch.dtype,
    source: dict[str, Any],
    tokenizer: dict[str, str] | None = None,
) -> Path:
    """Write a weights-only engine checkpoint (iteration 0) at TP x PP from canonical tensors
    given by name, one parameter at a time; returns its directory. ``source`` describes the
    input (recorded as ``config.converted_from``), ``tokenizer`` its tokenizer flags."""
    save_dir = Path(save_dir)
    if (save_dir / LATEST_FILE).exists():  # never repoint a training run's `latest` to 0
        raise ConversionError(
            f"--save-dir {save_dir} already holds a checkpoint ({LATEST_FILE}): choose a new "
            "directory"
        )
    final = iteration_dir(save_dir, 0)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = dataclasses.replace(config, params_dtype=dtype)
    files: list[str] = []
    checksums: dict[str, dict] = {}
    for pp_rank, placements in enumerate(stage_placements(config, tp_size, pp_size)):
        # One writer per TP rank of the stage: each full parameter is built once and every
        # rank's shard goes to its file straight away.
        writers, index = [], []
        for tp_rank in range(tp_size):
            mine = [with_tp_rank(p, tp_rank) for p in placements]
            mine = [p for p in mine if p.partition_dim is not None or tp_rank == 0]
            entries = {f"{MODEL_STATE}/{p.param}/0": p for p in mine}
            index.append(entries)
            name = f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"
            specs = [(key, dtype, tuple(p.local_shape)) for key, p in entries.items()]
            meta = {"index": json.dumps({k: dataclasses.asdict(p) for k, p in entries.items()})}
            writers.append(StreamingSafetensorsWriter(tmp / name, specs, meta))
            files.append(name)
        for placement in placements:
            parts = {name: canonical(name).to(dtype) for name, _ in placement.parts}
            for tp_rank, writer in enumerate(writers):
                key = f"{MODEL_STATE}/{placement.param}/0"
                if key in index[tp_rank]:
                    local = local_from_canonical(index[tp_rank][key], parts.__getitem__)
                    writer.write(key, local)
            del parts
        for name, writer in zip(files[-len(writers) :], writers, strict=True):
            writer.close()
            checksums[name] = writer.checksum()
    layout = {
        "world_size": tp_size * pp_size, "tensor_model_parallel_size": tp_size,
        "pipeline_model_parallel_size": pp_size, "virtual_pipeline_model_parallel_size": None,
        "data_parallel_size": 1,
    }  # fmt: skip
    config_dict = {"converted_from": source, "data": tokenizer or {}}
    metadata = metadata_record(
        0, 0, layout, config_record(config), config_dict, sorted(files),
        checksums=checksums_record(checksums),
    )  # fmt: skip
    write_text_atomic(tmp / METADATA_FILE, json.dumps(metadata, indent=1))
    publish(tmp, final)
    write_text_atomic(save_dir / LATEST_FILE, "0")
    return final
