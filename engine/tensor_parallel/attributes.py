"""What a parameter says about how it is laid out over the TP group and how its gradient is
reduced; the parallel layers set these attributes, and clipping, gradient reduction and
checkpoints read them through the functions here.

- ``tensor_model_parallel``, ``partition_dim``, ``partition_sizes``: the parameter is this
  rank's shard along ``partition_dim`` of each block (full sizes ``partition_sizes``, e.g. the
  Q, K and V blocks of a fused projection) of the full tensor;
- ``partial_grad_over_tp``: the parameter is replicated over TP but each rank holds only part
  of its gradient (norm weights under sequence parallelism, replicated K/V), so the gradients
  are summed over TP once per step (`engine.distributed.finalize_grads`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mark_tensor_parallel(
    param: nn.Parameter, partition_dim: int, partition_sizes: Sequence[int]
) -> nn.Parameter:
    """Flag ``param`` as a TP shard along ``partition_dim`` of blocks of ``partition_sizes``."""
    # Attributes attached to the tensor at run time: torch's stubs do not declare them.
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = partition_dim  # type: ignore[attr-defined]
    param.partition_sizes = tuple(partition_sizes)  # type: ignore[attr-defined]
    return param


def is_tensor_parallel(param: nn.Parameter) -> bool:
    """``param`` is a shard of a larger tensor split over TP."""
    return bool(getattr(param, "tensor_model_parallel", False))


def mark_partial_over_tp(param: nn.Parameter, partial: bool = True) -> nn.Parameter:
    """Flag a replicated parameter whose gradient each TP rank holds only a part of."""
    param.partial_grad_over_tp = partial  # type: ignore[attr-defined]
    return param


def is_partial_over_tp(param: nn.Parameter) -> bool:
    """``param``'s gradient must be summed over TP before the step."""
    return bool(getattr(param, "partial_grad_over_tp", False))
