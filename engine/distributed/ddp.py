"""Data parallelism: gradients in one flat buffer, reduced bucket by bucket, overlapped.

`DistributedDataParallel` wraps one model chunk. For each parameter dtype it allocates a
`ParamAndGradBuffer`: a contiguous gradient tensor (float32 by default, whatever the
parameters' dtype) of which every parameter's ``main_grad`` is a view. Parameters are laid out
in reverse registration order, which is roughly the order backward produces their gradients,
and the buffer is cut into buckets of about ``--ddp-bucket-size`` elements.

A hook on each parameter's gradient accumulation adds ``param.grad`` into ``main_grad`` and
frees ``param.grad``, so microbatches accumulate in float32 in the buffer. During the last
microbatch's backward (outside `no_sync`), with ``--overlap-grad-reduce``, the hook marks the
parameter ready and launches its bucket's collective asynchronously as soon as the bucket is
complete: early buckets travel while backward still computes later layers' gradients.
`finish_grad_sync` launches whatever is left and waits, before the optimizer step.

The collective is an all-reduce of the bucket, or, for the distributed optimizer (ZeRO-1),
a reduce-scatter that leaves each DP rank the sum of its own 1/DP slice of every bucket;
buckets are then padded so they split evenly. Gradients are averaged over DP once, by scaling
the bucket by 1/DP just before its collective (gloo has no averaging reduction).

For the distributed optimizer the parameters too live in a flat buffer with the same layout
(``param.data`` is a view), so the updated slices are all-gathered straight into the
parameters, optionally overlapped with the next forward (``--overlap-param-gather``): forward
pre-hooks wait for a module's buckets just before it runs.

Hooks for pipeline schedules (Megatron's names): ``no_sync`` is the ``no_sync_func``,
``start_grad_sync`` the ``grad_sync_func``, ``start_param_sync`` the ``param_sync_func``;
`engine.distributed.finalize_model_grads` calls ``finish_grad_sync``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.distributed.config import DistributedDataParallelConfig

# Every shard of a bucket is a multiple of this many elements, so shards start aligned.
_SHARD_ALIGNMENT = 64


def reduce_scatter_async(
    output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup
) -> Any:
    """Async reduce-scatter of ``input`` [n] into ``output`` [n / world] (may alias input)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=True)


def all_gather_async(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup) -> Any:
    """Async all-gather of ``input`` [n / world] into ``output`` [n] (input may alias it)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=True)


class Bucket:
    """Parameters whose gradients occupy ``[offset, offset + numel)`` of a buffer, reduced by
    one collective. ``grad_data`` (and ``param_data`` with the distributed optimizer) are
    views ``[numel]`` of the buffer; ``numel`` includes the end padding."""

    def __init__(
        self,
        params: list[nn.Parameter],
        grad_data: torch.Tensor,
        param_data: torch.Tensor | None,
        offset: int,
        group: dist.ProcessGroup,
        use_distributed_optimizer: bool,
    ):
        self.params, self.grad_data, self.param_data = params, grad_data, param_data
        self.offset, self.numel = offset, grad_data.numel()
        self.group, self.use_distributed_optimizer = group, use_distributed_optimizer
        self.dp_size, self.dp_rank = dist.get_world_size(group), dist.get_rank(group)
        self.grad_handle: Any = None
        self.grad_launched = False
        self.param_handle: Any = None
        self.pending: set[nn.Parameter] = set(params)

    @property
    def shard_numel(self) -> int:
        return self.numel // self.dp_size

    def shard(self, data: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """This (or ``rank``'s) DP rank's slice ``[numel / dp]`` of a bucket-sized tensor."""
        rank = self.dp_rank if rank is None else rank
        return data[rank * self.shard_numel : (rank + 1) * self.shard_numel]

    def reset(self) -> None:
        self.pending = set(self.params)
        self.grad_handle, self.grad_launched = None, False

    def start_grad_sync(self) -> None:
        """Average and launch this bucket's collective (once per step)."""
        if self.grad_launched:
            return
        self.grad_launched = True
        if self.dp_size == 1:
            return
        self.grad_data.mul_(1.0 / self.dp_size)
        if self.use_distributed_optimizer:
            self.grad_handle = reduce_scatter_async(
                self.shard(self.grad_data), self.grad_data, self.group
            )
        else:
            self.grad_handle = dist.all_reduce(self.grad_data, group=self.group, async_op=True)

    def finish_grad_sync(self) -> None:
        self.start_grad_sync()
        if self.grad_handle is not None:
            self.grad_handle.wait()
            self.grad_handle = None

    def register_grad_ready(self, param: nn.Parameter) -> None:
        """Called from the backward hook in the last microbatch: launch when complete."""
        if self.grad_launched:
            raise RuntimeError(
                "--overlap-grad-reduce: a gradient arrived after its bucket's reduction was "
                "launched, so it would be lost; run every microbatch but the last under "
                "model.no_sync() (the schedules' no_sync_func), and call "
                "zero_grad_buffer() before the next iteration"
            )
        self.pending.discard(param)
        if not self.pending:
            self.start_grad_sync()

    def start_param_sync(self) -> None:
        """Launch the all-gather of the updated parameter slices (distributed optimizer)."""
        if self.dp_size > 1 and self.param_handle is None:
            assert self.param_data is not None, "only buckets of a distributed optimizer sync"
            self.param_handle = all_gather_async(
                self.param_data, self.shard(self.param_data), self.group
            )

    def finish_param_sync(self) -> None:
        if self.param_handle is not None:
            self.param_handle.wait()
            self.param_handle = None


class ParamAndGradBuffer:
    """The flat gradient (and parameter) storage of one parameter dtype.

    Attributes:
        grad_data: ``[numel]`` gradients, ``grad_dtype``; ``param.main_grad`` views into it.
        param_data: ``[numel]`` parameters (distributed optimizer only; ``param.data`` views).
        buckets: consecutive `Bucket` s covering the buffer.
        param_index: parameter -> ``(start, end)`` element range in the buffer.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        grad_dtype: torch.dtype,
        bucket_size: int | None,
        group: dist.ProcessGroup,
        use_distributed_optimizer: bool,
        own_bucket: set[nn.Parameter] | None = None,
    ):
        dp = dist.get_world_size(group)
        own_bucket = own_bucket or set()
        pad_to = dp * _SHARD_ALIGNMENT if use_distributed_optimizer else 1
        self.param_dtype = params[0].dtype
        self.param_index: dict[nn.Parameter, tuple[int, int]] = {}
        bucket_ranges: list[tuple[int, int, list[nn.Parameter]]] = []
        offset, bucket_start = 0, 0
        bucket_params: list[nn.Parameter] = []

        def close_bucket() -> None:
            nonlocal offset, bucket_start, bucket_params
            if bucket_params:
                offset = math.ceil(offset / pad_to) * pad_to
                bucket_ranges.append((bucket_start, offset, bucket_params))
                bucket_start, bucket_params = offset, []

        for param in params:
            if param in own_bucket:
                close_bucket()
            self.param_index[param] = (offset, offset + param.numel())
            offset += param.numel()
            bucket_params.append(param)
            full = bucket_size is not None and offset - bucket_start >= bucket_size
            if full or param in own_bucket:
                close_bucket()
        close_bucket()
        self.numel = offset

        device = params[0].device
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data: torch.Tensor | None = None
        if use_distributed_optimizer:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        for param, (start, end) in self.param_index.items():
            # An attribute attached at run time (torch's stubs do not declare it).
            main_grad = self.grad_data[start:end].view(param.shape)
            param.main_grad = main_grad  # type: ignore[attr-defined]
            if self.param_data is not None:
                # The parameter now lives in the buffer, so all-gathers update it in place.
                self.param_data[start:end].copy_(param.data.view(-1))
                param.data = self.param_data[start:end].view(param.shape)
        self.buckets = [
            Bucket(
                ps, self.grad_data[s:e], None if self.param_data is None else self.param_data[s:e],
                s, group, use_distributed_optimizer,
            )
            for s, e, ps in bucket_ranges
        ]  # fmt: skip


class DistributedDataParallel(nn.Module):
    """Wraps a model chunk: gradient buffers, bucketed (overlapped) DP reduction.

    Args:
        module: the model chunk (this rank's TP/PP share).
        config: see `DistributedDataParallelConfig`.
        data_parallel_group: defaults to the data-parallel group with the context-parallel
            ranks (`parallel_state.get_data_parallel_group(with_context_parallel=True)`):
            CP ranks compute gradients of the same weights on different tokens.

    The forward is the wrapped module's. Typical iteration::

        model.zero_grad_buffer()
        for each microbatch but the last:
            with model.no_sync(): backward
        backward of the last microbatch   # overlapped buckets launch here
        finalize_model_grads([model])      # finish_grad_sync + TP-partial sums
        optimizer.step()
    """

    def __init__(
        self,
        module: nn.Module,
        config: DistributedDataParallelConfig | None = None,
        data_parallel_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        self.module = module
        self.config = config or DistributedDataParallelConfig()
        if self.config.overlap_param_gather and not self.config.use_distributed_optimizer:
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer")
        self.data_parallel_group = data_parallel_group or parallel_state.get_data_parallel_group(
            with_context_parallel=True
        )
        self.is_last_microbatch = True

        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for param in reversed(list(module.parameters())):  # ~ the order backward fills them
            if param.requires_grad:
                by_dtype.setdefault(param.dtype, []).append(param)
        self.buffers_by_dtype: dict[torch.dtype, ParamAndGradBuffer] = {}
        # A tied embedding's two copies (first and last stage) are summed over the embedding
        # group after the DP reduce-scatter; in a bucket of their own, both copies' DP slices
        # cover the same elements, so the sum of the slices is right.
        shared = getattr(module, "shared_embedding_or_output_weight", lambda: None)()
        own_bucket = (
            {shared} if shared is not None and self.config.use_distributed_optimizer else set()
        )
        for dtype, params in by_dtype.items():
            grad_dtype = torch.float32 if self.config.grad_reduce_in_fp32 else dtype
            self.buffers_by_dtype[dtype] = ParamAndGradBuffer(
                params, grad_dtype, self.config.bucket_size, self.data_parallel_group,
                self.config.use_distributed_optimizer, own_bucket,
            )  # fmt: skip
        self.param_to_bucket: dict[nn.Parameter, Bucket] = {
            p: bucket for bucket in self.buckets for p in bucket.params
        }
        self._hook_handles = [
            p.register_post_accumulate_grad_hook(self._grad_hook) for p in self.param_to_bucket
        ]
        if self.config.overlap_param_gather:
            for sub in module.modules():
                if any(True for _ in sub.parameters(recurse=False)):
                    self._hook_handles.append(sub.register_forward_pre_hook(self._param_wait_hook))

    @property
    def grad_buffers(self) -> list[ParamAndGradBuffer]:
        """One per parameter dtype. (Not ``buffers``: that is `nn.Module.buffers()`.)"""
        return list(self.buffers_by_dtype.values())

    @property
    def buckets(self) -> list[Bucket]:
        return [bucket for buffer in self.grad_buffers for bucket in buffer.buckets]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _grad_hook(self, param: nn.Parameter) -> None:
        """After autograd accumulated ``param.grad``: move it into the float32 buffer."""
        if param.grad is not None:
            param.main_grad.add_(param.grad)  # type: ignore[attr-defined]
            param.grad = None  # the buffer holds it now; free the model-dtype copy
        if self.config.overlap_grad_reduce and self.is_last_microbatch:
            self.param_to_bucket[param].register_grad_ready(param)

    def _param_wait_hook(self, module: nn.Module, args: Any) -> None:
        """Before a module runs, wait for the all-gathers of its parameters' buckets."""
        for param in module.parameters(recurse=False):
            bucket = self.param_to_bucket.get(param)
            if bucket is not None:
                bucket.finish_param_sync()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (all microbatches but the last)."""
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = True

    def start_grad_sync(self, *unused: Any) -> None:
        """Launch the collectives of every bucket not launched yet (asynchronous)."""
        for bucket in self.buckets:
            bucket.start_grad_sync()

    def finish_grad_sync(self) -> None:
        """Launch what is left and wait for all buckets: gradients are then DP-averaged
        (all-reduce), or this rank's shards are (distributed optimizer)."""
        self.start_grad_sync()
        for bucket in self.buckets:
            bucket.finish_grad_sync()

    def start_param_sync(self, *unused: Any) -> None:
        """Launch the all-gathers of updated parameters, first layers' buckets first."""
        for bucket in reversed(self.buckets):
            bucket.start_param_sync()

    def finish_param_sync(self) -> None:
        for bucket in self.buckets:
            bucket.finish_param_sync()

    def zero_grad_buffer(self) -> None:
        """Zero the gradient buffers and reset the buckets (start of an iteration)."""
        for param in self.param_to_bucket:
            param.grad = None
        for buffer in self.grad_buffers:
            buffer.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset()

    def broadcast_params(self) -> None:
        """Make every DP replica start from DP rank 0's parameters."""
        if dist.get_world_size(self.data_parallel_group) == 1:
            return
        source = dist.get_global_rank(self.data_parallel_group, 0)
        for param in self.module.parameters():
            dist.broadcast(param.data, src=source, group=self.data_parallel_group)
