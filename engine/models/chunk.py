"""What the engine reads from a built model chunk, in one place: its configuration, its
parameter inventory and the global number of each of its layers. A module that lacks one is
not a model chunk of a registered family, and the error says which attribute is missing."""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from engine.models.config import ModelConfig
from engine.models.inventory import Inventory


def config_of(module: nn.Module) -> ModelConfig:
    """The chunk's `ModelConfig` (``module.config``)."""
    config = getattr(module, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"{type(module).__name__} is not a model chunk: it has no ModelConfig")
    return config


def inventory_of(module: nn.Module) -> Inventory:
    """The chunk's parameter inventory (``module.inventory``)."""
    inventory = getattr(module, "inventory", None)
    if not isinstance(inventory, Inventory):
        raise TypeError(f"{type(module).__name__} is not a model chunk: it has no inventory")
    return inventory


def layer_numbers(module: nn.Module) -> list[int]:
    """The global layer number of each of the chunk's ``layers``, in order."""
    layers = getattr(module, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(module).__name__} is not a model chunk: it has no layers")
    return [int(cast(Any, layer).layer_number) for layer in layers]
