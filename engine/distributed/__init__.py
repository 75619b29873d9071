"""Data parallelism and gradient reduction across ranks after the backward pass."""

from engine.distributed.ddp import DistributedDataParallel
from engine.distributed.finalize_grads import finalize_model_grads
from engine.distributed.fsdp import FullyShardedDataParallel

DataParallelChunk = DistributedDataParallel | FullyShardedDataParallel
"""A model chunk in either data-parallel wrapper: what the optimizer reads gradients from."""

__all__ = [
    "DataParallelChunk",
    "DistributedDataParallel",
    "FullyShardedDataParallel",
    "finalize_model_grads",
]
