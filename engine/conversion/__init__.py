"""Checkpoint conversion: HuggingFace / Meta <-> engine checkpoints, and resharding."""

from engine.conversion.convert import ConversionError, engine_to_hf, hf_to_engine, reshard

__all__ = ["ConversionError", "engine_to_hf", "hf_to_engine", "reshard"]
