"""Checkpoint conversion: HuggingFace / Meta <-> engine checkpoints, and resharding
(`convert`), over lazy sources (`sources`) and a streaming engine-checkpoint writer
(`writer`); names, shapes and placements come from the model's parameter inventory."""

from engine.conversion.convert import engine_to_hf, hf_to_engine, reshard
from engine.conversion.errors import ConversionError

__all__ = ["ConversionError", "engine_to_hf", "hf_to_engine", "reshard"]
