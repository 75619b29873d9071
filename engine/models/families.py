"""Model families by name: what builds a family's model chunks, its parameter inventory, and
its adapters to other checkpoint formats.

`ModelConfig.family` names the family a configuration belongs to; every part of the engine
that needs a model's weights without building it (checkpoints, conversion, the cost model)
asks `family_of(config)`. A family registers itself when its package is imported
(`engine.models` imports the built-in ones).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.models.inventory import Inventory

if TYPE_CHECKING:
    from engine.models.config import ModelConfig


@dataclass(frozen=True)
class HFAdapter:
    """How a family's configuration reads and writes a HuggingFace ``config.json``; tensor
    names come from the inventory (`CanonicalTensor.hf`)."""

    model_types: tuple[str, ...]
    """The ``model_type`` values of ``config.json`` this family reads."""
    config_from_hf: Callable[[dict[str, Any], int], ModelConfig]
    """``(config.json dict, make_vocab_size_divisible_by) -> ModelConfig``; raises ValueError
    naming every field the family cannot represent."""
    config_to_hf: Callable[[ModelConfig, torch.dtype], dict[str, Any]]
    """``(config, dtype) -> config.json dict`` of the same architecture."""
    source_name: Callable[[str], str | None] = lambda name: name
    """A tensor's name in a HF file -> its name in the inventory (`CanonicalTensor.hf`), or
    None for a tensor that is not a weight (a rotary or mask buffer): files saved by other
    classes of the same model (without a prefix, say) read as the inventory names them."""


@dataclass(frozen=True)
class ModelFamily:
    """One model family (see the module docstring)."""

    name: str
    model: Callable[..., nn.Module]
    """Builds one chunk: ``model(config, pre_process=None, post_process=None,
    layer_numbers=None)``."""
    inventory: Callable[[ModelConfig, int], Inventory]
    """``(config, tp_size) -> Inventory``: every parameter, declared once."""
    architecture_flags: Mapping[str, str] = field(default_factory=dict)
    """Configuration fields that fix the parameters' shapes, with the flag that sets each."""
    hf: HFAdapter | None = None
    meta_reader: Callable[[Path], Any] | None = None
    """Opens Meta's original checkpoint directory as a HF-named source (if the family has one)."""
    flops_per_token: Callable[[ModelConfig, int], int] | None = None
    """``(config, seq_length) -> forward + backward FLOPs per token`` for MFU; None: the
    decoder formula of `engine.models.flops`."""
    unused_config_fields: tuple[str, ...] = ()
    """`ModelConfig` fields this family ignores: setting their flags is an error, not a no-op."""


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add (or replace) a family under its name."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(
            f"unknown model family {name!r} (registered: {', '.join(sorted(FAMILIES))}); a "
            "family of your own is registered with --model-provider package.module:attribute"
        )
    return FAMILIES[name]


MODEL_PROVIDER_HELP = (
    "package.module:attribute naming a ModelFamily (engine.models.families), or a callable "
    "returning one, to build instead of the built-in families; the module must be importable"
)


def load_model_provider(spec: str) -> ModelFamily:
    """``--model-provider package.module:attribute``: import the module, take the attribute
    (a `ModelFamily`, or a callable that returns one) and register the family. ValueError
    naming the flag and what was wrong."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--model-provider {spec!r}: expected package.module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"--model-provider {spec!r}: cannot import {module_name}: {error}"
        ) from None
    provider = getattr(module, attribute, None)
    if provider is None:
        raise ValueError(f"--model-provider {spec!r}: {module_name} has no {attribute!r}")
    family = provider() if callable(provider) else provider
    if not isinstance(family, ModelFamily):
        raise ValueError(
            f"--model-provider {spec!r} gave a {type(family).__name__}, not a ModelFamily"
        )
    return register_family(family)


def add_model_provider_flag(parser: argparse.ArgumentParser) -> None:
    """``--model-provider`` for a tool: the family is imported and registered while the
    command line is parsed, and a bad value is the parser's usage error."""

    def provider(spec: str) -> ModelFamily:
        try:
            return load_model_provider(spec)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parser.add_argument(
        "--model-provider", type=provider, default=None, metavar="MODULE:ATTRIBUTE",
        help=MODEL_PROVIDER_HELP,
    )  # fmt: skip


def family_of(config: ModelConfig) -> ModelFamily:
    """The family that builds ``config``."""
    return get_family(config.family)


def family_for_hf(model_type: str | None) -> ModelFamily:
    """The family that reads HF ``config.json`` files of ``model_type``."""
    for family in FAMILIES.values():
        if family.hf is not None and model_type in family.hf.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() if f.hf for t in f.hf.model_types)
    raise ValueError(f"model_type {model_type!r} (supported: {', '.join(map(repr, known))})")
