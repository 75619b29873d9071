"""Fully sharded data parallelism with PyTorch's FSDP2 (``--use-torch-fsdp2``).

`FullyShardedDataParallel` applies `torch.distributed.fsdp.fully_shard` to every decoder layer
of a model chunk and to the chunk itself, over the data-parallel group (with the CP ranks).
Each parameter becomes a DTensor sharded along its first dimension over DP. A tensor-parallel
layer's local shard is an ordinary tensor to FSDP, so a parameter is split over TP first and
then over DP. Before each layer's forward and backward, FSDP all-gathers its parameters. After
the backward, it reduce-scatters their gradients into the parameters' sharded ``.grad``.

The wrapper shows the trainer the face of `engine.distributed.DistributedDataParallel`: the
schedule's gradient-sync hooks and the optimizer's ``main_grad``.

- ``main_grad`` is the local shard of the parameter's ``.grad``, allocated once and zeroed in
  place. FSDP accumulates into it, so the optimizer's flat views stay valid.
- ``no_sync()`` holds the reduce-scatter for every microbatch but the last. Gradients then
  accumulate unsharded and are reduced once per step, as with DDP. With
  ``--fsdp-reduce-every-microbatch`` each microbatch is reduce-scattered instead, and the
  gradients stay sharded.
- Mixed precision follows FSDP's `MixedPrecisionPolicy`. The sharded parameters (the master
  weights) stay float32, layers compute in ``param_dtype`` (bf16 with ``--bf16``), and
  gradients are reduced in float32.

The parameter attributes the engine reads (TP layout, partial-over-TP gradients) are copied
onto FSDP's new parameters, so gradient finalisation and clipping work as without FSDP.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.distributed.config import DistributedDataParallelConfig


def _fsdp():
    """FSDP2's entry points (imported on use: `torch.distributed.fsdp` is heavy)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    return DeviceMesh, MixedPrecisionPolicy, fully_shard


def is_fully_sharded(param: torch.Tensor) -> bool:
    """An FSDP2 parameter (a DTensor: this rank holds some of its rows)."""
    return hasattr(param, "to_local") and hasattr(param, "placements")


def local_rows(param: nn.Parameter) -> tuple[torch.Tensor, int, int]:
    """This rank's rows of an FSDP2 parameter, flattened (its storage), and where they sit in
    the flattened whole (TP-local) parameter: ``[start, end)``. FSDP splits dim 0 as
    ``torch.chunk`` does: ``ceil(rows / dp)`` rows a rank, in rank order."""
    local = cast(Any, param).to_local().detach().view(-1)
    mesh = cast(Any, param).device_mesh
    row = math.prod(param.shape[1:])
    rows_per_rank = -(-param.shape[0] // mesh.size())
    start = min(mesh.get_local_rank() * rows_per_rank, param.shape[0]) * row
    return local, start, start + local.numel()


def _engine_attributes(param: nn.Parameter) -> dict[str, Any]:
    """What the engine's layers set on a parameter (FSDP's own bookkeeping left out)."""
    return {k: v for k, v in vars(param).items() if not k.startswith("_")}


class FullyShardedDataParallel(nn.Module):
    """A model chunk sharded with FSDP2 over the data-parallel group (module docstring).

    Args:
        module: the model chunk (this rank's TP/PP share), float32, best still on the host:
            ``fully_shard`` moves one layer at a time to ``device`` and keeps its rows there,
            so the device never holds the whole chunk (a 7B model's float32 weights are 28 GB).
        config: ``use_torch_fsdp2`` must be set.
        data_parallel_group: default: DP x CP (`parallel_state`), as gradients are averaged.
        param_dtype: the dtype layers compute in (None: the parameters').
        device: where the shards live (default: the module's).
    """

    def __init__(
        self,
        module: nn.Module,
        config: DistributedDataParallelConfig,
        data_parallel_group: dist.ProcessGroup | None = None,
        param_dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        device_mesh, mixed_precision, fully_shard = _fsdp()
        self.config = config
        self.data_parallel_group = data_parallel_group or parallel_state.get_data_parallel_group(
            with_context_parallel=True
        )
        device = device or next(module.parameters()).device
        mesh = device_mesh.from_group(self.data_parallel_group, device.type)
        policy = mixed_precision(param_dtype=param_dtype, reduce_dtype=torch.float32)
        attributes = {name: _engine_attributes(p) for name, p in module.named_parameters()}
        layers = getattr(module, "layers", [])
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        self.module = module
        for name, param in module.named_parameters():
            for key, value in attributes[name].items():
                setattr(param, key, value)
            if param.requires_grad:
                # FSDP accumulates into an existing sharded gradient in place.
                param.grad = torch.zeros_like(param)
                param.main_grad = param.grad.to_local().detach()  # type: ignore[attr-defined]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Hold the gradient reduce-scatter (every microbatch but the last), unless
        ``fsdp_reduce_every_microbatch``: FSDP then sums each microbatch's reduced shard."""
        if self.config.fsdp_reduce_every_microbatch:
            yield
            return
        self.module.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)  # type: ignore[operator]

    def start_grad_sync(self, *unused: Any) -> None:
        """FSDP reduces in its own post-backward hooks: nothing to start (the schedule's
        ``grad_sync_func(params)``)."""

    def finish_grad_sync(self) -> None:
        """FSDP's root post-backward waits for its reductions: nothing to finish."""

    def finish_param_sync(self) -> None:
        """Parameters are all-gathered before each use: nothing is left in flight."""

    def zero_grad_buffer(self) -> None:
        """Zero the sharded gradients in place (the optimizer's views stay valid)."""
        for param in self.module.parameters():
            if param.grad is not None:
                cast(Any, param.grad).to_local().zero_()
