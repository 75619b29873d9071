"""What must happen to gradients between the last backward and the optimizer step.

Some parameters are replicated over the TP group but each rank sees only part of their
gradient: RMSNorm weights under sequence parallelism (each rank holds a slice of the
sequence), and K/V projections replicated because there are fewer K/V heads than TP ranks
(each rank uses only the heads its queries need). Their gradients are summed over TP once per
step, in one flat all-reduce, rather than inside every microbatch's backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, cast

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from engine import parallel_state
from engine.tensor_parallel.attributes import is_partial_over_tp
from engine.wrappers import unwrap


class _TiedEmbeddingModel(Protocol):
    def shared_embedding_or_output_weight(self) -> nn.Parameter | None: ...


def _all_reduce_flat(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(synced)


def allreduce_embedding_grads(model_chunks: list[nn.Module]) -> None:
    """Sum the gradients of a tied embedding's two copies over the embedding group.

    With pipeline parallelism and tied embeddings, the first stage's input embedding and the
    last stage's output head are two copies of one weight ``[vocab/tp, h]``; each gets the
    gradient of its own use. Summing them keeps the copies equal after every step (they start
    equal: same seed). Chunk 0 holds the first stage's copy, the last chunk the last stage's.
    """
    group = parallel_state.get_embedding_group()
    if group is None or dist.get_world_size(group) == 1:
        return
    ends = {id(chunk): chunk for chunk in (model_chunks[0], model_chunks[-1])}.values()
    for chunk in ends:
        weight = cast(_TiedEmbeddingModel, unwrap(chunk)).shared_embedding_or_output_weight()
        if weight is None:
            continue
        # A data-parallel wrapper may accumulate into a main_grad buffer instead of .grad.
        grad = getattr(weight, "main_grad", None)
        dist.all_reduce(weight.grad if grad is None else grad, group=group)


def finish_data_parallel_grad_sync(model_chunks: list[nn.Module]) -> None:
    """Wait for the DP reduction of chunks wrapped in DistributedDataParallel: it may still be
    in flight (overlapped with backward), and the sums below must neither race with it nor
    miss it."""
    for chunk in model_chunks:
        finish_grad_sync = getattr(chunk, "finish_grad_sync", None)
        if finish_grad_sync is not None:
            finish_grad_sync()


def _grad_of(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient to reduce: the DP wrapper's float32 ``main_grad`` if any, else ``.grad``."""
    return getattr(param, "main_grad", param.grad)


def finalize_model_grads(model_chunks: Iterable[nn.Module]) -> None:
    """Sum the TP-partial gradients of ``model_chunks`` over the TP group (after backward),
    and the tied embedding's gradients over the first and last pipeline stage."""
    model_chunks = list(model_chunks)
    finish_data_parallel_grad_sync(model_chunks)
    allreduce_embedding_grads(model_chunks)
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    grads = [
        grad
        for chunk in model_chunks
        for p in chunk.parameters()
        if is_partial_over_tp(p) and (grad := _grad_of(p)) is not None
    ]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same_dtype in by_dtype.values():
        _all_reduce_flat(same_dtype, group)
