"""Tensor-parallel communication as autograd functions.

Each forward collective is paired with its conjugate in the backward, so tensor parallelism
reads as algebra (Megatron's f and g operators):

    copy_to_tensor_model_parallel_region        forward: identity      backward: all-reduce
    reduce_from_tensor_model_parallel_region    forward: all-reduce    backward: identity
    scatter_to_tensor_model_parallel_region     forward: split last    backward: all-gather last
    gather_from_tensor_model_parallel_region    forward: gather last   backward: split last

and along the sequence (first) dimension, for sequence parallelism:

    scatter_to_sequence_parallel_region         forward: split first   backward: all-gather first
    gather_from_sequence_parallel_region        forward: gather first  backward: reduce-scatter
    reduce_scatter_to_sequence_parallel_region  forward: reduce-scatter backward: all-gather first

Every function takes an explicit process group; ``None`` means the TP group of
`engine.parallel_state`. Activations are sequence-first, ``[seq, batch, hidden]``, so that the
sequence split is a contiguous slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine import parallel_state

# `all_gather_into_tensor` / `reduce_scatter_tensor` were renamed `*_single` in newer PyTorch.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _resolve(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.size(dim) % world != 0:
        raise ValueError(
            f"cannot split dimension {dim} of size {x.size(dim)} over {world} tensor-parallel "
            "ranks: it must be divisible"
        )
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def all_gather_along_first_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[n, ...]`` on each rank -> ``[world * n, ...]`` in rank order (no autograd)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((x.size(0) * world, *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return out


def _gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_along_first_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``[world * n, ...]`` over ranks, keep this rank's ``[n, ...]`` (no autograd)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.size(0) % world != 0:
        raise ValueError(
            f"cannot reduce-scatter a sequence of length {x.size(0)} over {world} "
            "tensor-parallel ranks: it must be divisible"
        )
    x = x.contiguous()
    out = x.new_empty((x.size(0) // world, *x.shape[1:]))
    _reduce_scatter_single(out, x, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along(grad, -1, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_along(grad, -1, ctx.group), None


class _ScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along_first_dim(grad, ctx.group), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return all_gather_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        # Feeding a column-parallel layer, each rank holds a partial gradient of the whole
        # sequence: reduce-scatter sums them. Otherwise every rank has the full gradient.
        if ctx.grad_is_partial:
            return reduce_scatter_along_first_dim(grad, ctx.group), None, None
        return _split_along(grad, 0, ctx.group), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along_first_dim(grad, ctx.group), None


def copy_to_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient. Marks where a replicated input enters."""
    return _CopyToRegion.apply(x, _resolve(group))


def reduce_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-reduce forward (sums partial results); identity backward."""
    return _ReduceFromRegion.apply(x, _resolve(group))


def scatter_to_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension: ``[..., h] -> [..., h/tp]``."""
    return _ScatterToRegion.apply(x, _resolve(group))


def gather_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-gather along the last dimension: ``[..., h/tp] -> [..., h]``."""
    return _GatherFromRegion.apply(x, _resolve(group))


def scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Keep this rank's chunk of the sequence: ``[s, b, h] -> [s/tp, b, h]``."""
    return _ScatterToSequenceRegion.apply(x, _resolve(group))


def gather_from_sequence_parallel_region(
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    tensor_parallel_output_grad: bool = True,
) -> torch.Tensor:
    """All-gather the sequence: ``[s/tp, b, h] -> [s, b, h]``.

    Args:
        tensor_parallel_output_grad: the consumer is tensor-parallel, so each rank's gradient
            is partial and the backward reduce-scatters; otherwise the backward just splits.
    """
    return _GatherFromSequenceRegion.apply(x, _resolve(group), tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence chunk: ``[s, b, h] -> [s/tp, b, h]``."""
    return _ReduceScatterToSequenceRegion.apply(x, _resolve(group))
