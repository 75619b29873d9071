"""Modules that wrap a model (data-parallel, mixed precision) keep it as ``.module``."""

from __future__ import annotations

from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside every wrapper (however many are stacked)."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module
