"""A trained model and its tokenizer for the tools (generation, evaluation), from any
checkpoint and at any layout."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from engine.checkpointing import load_checkpoint, open_checkpoint
from engine.data.tokenizer import Tokenizer, build_tokenizer
from engine.models.build import build_uninitialised
from engine.models.config import ModelConfig
from engine.models.families import family_of


def load_model(load_dir: str | Path, iteration: int | None = None) -> nn.Module:
    """This rank's model chunk (of the family the checkpoint records) with the checkpoint's
    weights (any saved layout), on the CPU; the parallel state must be initialised (no
    virtual pipeline). Built uninitialised: no weight is drawn only to be overwritten."""
    _, metadata = open_checkpoint(load_dir, iteration)
    # Training-only settings do not apply: windows have any length (no sequence parallelism),
    # nothing is recomputed without a backward, and stages compute in the weights' dtype.
    config = replace(
        ModelConfig.from_dict(metadata["model"]),
        sequence_parallel=False,
        recompute_granularity=None,
        pipeline_dtype=None,
    )
    model = build_uninitialised(lambda: family_of(config).model(config))
    load_checkpoint(load_dir, [model], load_rng=False, iteration=iteration)
    return model.eval()


def load_tokenizer(
    load_dir: str | Path,
    iteration: int | None = None,
    tokenizer_type: str | None = None,
    tokenizer_model: str | None = None,
) -> Tokenizer | None:
    """The tokenizer of ``--tokenizer-type`` / ``--tokenizer-model`` when given, else the one
    the checkpoint records (its training run's, or a converted HF directory's); None if
    neither names one."""
    _, metadata = open_checkpoint(load_dir, iteration)
    data = metadata.get("config", {}).get("data") or {}
    tokenizer_type = tokenizer_type or data.get("tokenizer_type")
    tokenizer_model = tokenizer_model or data.get("tokenizer_model")
    return build_tokenizer(tokenizer_type, tokenizer_model) if tokenizer_type else None
