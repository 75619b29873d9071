"""Data parallelism and gradient reduction across ranks after the backward pass."""

from engine.distributed.ddp import DistributedDataParallel
from engine.distributed.finalize_grads import finalize_model_grads

__all__ = ["DistributedDataParallel", "finalize_model_grads"]
