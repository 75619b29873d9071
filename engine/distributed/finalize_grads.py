"""What must happen to gradients between the last backward and the optimizer step.

Some parameters are replicated over the TP group but each rank sees only part of their
gradient: RMSNorm weights under sequence parallelism (each rank holds a slice of the
sequence), and K/V projections replicated because there are fewer K/V heads than TP ranks
(each rank uses only the heads its queries need). Their gradients are summed over TP once per
step, in one flat all-reduce, rather than inside every microbatch's backward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from engine import parallel_state


def mark_partial_over_tp(param: nn.Parameter, partial: bool = True) -> nn.Parameter:
    """Flag a replicated parameter whose gradient each TP rank holds only a part of."""
    param.partial_grad_over_tp = partial
    return param


def _all_reduce_flat(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(synced)


def finalize_model_grads(model_chunks: Iterable[nn.Module]) -> None:
    """Sum the TP-partial gradients of ``model_chunks`` over the TP group (after backward)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    grads = [
        p.grad
        for chunk in model_chunks
        for p in chunk.parameters()
        if getattr(p, "partial_grad_over_tp", False) and p.grad is not None
    ]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same_dtype in by_dtype.values():
        _all_reduce_flat(same_dtype, group)
