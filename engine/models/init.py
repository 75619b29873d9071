"""Layout-free initialisation for any model built from the engine's layers.

Each parameter draws from its own generator, seeded by ``(init_seed, canonical name)``: the
parallel layers fill the full weight and keep their shard, so gathered weights are identical
at every TP size and pipeline split (what makes parity tests and resharding simple). A model
built on the GPU draws there, from CUDA generators with the same seeds: other values than on
the CPU, equally layout-free. A model whose weights a checkpoint fills draws nothing
(`engine.models.build.build_uninitialised`).
"""

from __future__ import annotations

import zlib

import torch

from engine.models.config import ModelConfig
from engine.tensor_parallel import InitMethod, normal_init
from engine.tensor_parallel.layers import any_device, draws_on_any_device


def seeded_init(config: ModelConfig, name: str, std: float | None = None) -> InitMethod:
    """Normal(0, ``std`` or ``config.init_method_std``) seeded by the parameter's canonical
    ``name``, not by the layout."""
    seed = zlib.crc32(f"{config.init_seed}:{name}".encode())
    return normal_init(config.init_method_std if std is None else std, seed)


def output_std(config: ModelConfig) -> float:
    """Megatron's (and GPT-2's) scaled init for the projections that write into the residual
    stream: ``init_method_std / sqrt(2L)``."""
    return config.init_method_std / (2.0 * config.num_layers) ** 0.5


def blocks_init(*inits: tuple[int, InitMethod]) -> InitMethod:
    """Init a fused weight block by block (``(rows, method)`` each, along dim 0)."""

    def init(full: torch.Tensor) -> None:
        row = 0
        for rows, method in inits:
            method(full[row : row + rows])
            row += rows

    return any_device(init) if all(draws_on_any_device(m) for _, m in inits) else init
