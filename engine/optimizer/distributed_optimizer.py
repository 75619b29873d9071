"""The distributed optimizer (ZeRO stage 1, ``--use-distributed-optimizer``).

Each DP rank owns the slice ``[r * n / dp, (r + 1) * n / dp)`` of every gradient bucket of
``n`` elements (see `engine.distributed.ddp`), and only for those elements does it keep float32
main parameters and Adam moments: optimizer state shrinks by the DP size. One step:

1. reduce-scatter each bucket's gradients (instead of all-reducing them): the rank receives
   the DP-averaged gradients of its slice only;
2. unscale / check / clip / AdamW on the slice (the global norm sums the slices over DP too);
3. write the updated slice into the flat parameter buffer (cast to bf16/fp16 if so) and
   all-gather every bucket's parameters, optionally overlapped with the next forward.

The communication volume equals an all-reduce's (reduce-scatter + all-gather), and memory per
rank for state is ``(4 + 4 + 4) bytes x N / dp`` (main params, exp_avg, exp_avg_sq; the
float32 main params alias the model for a float32 model).

A slice boundary may cut through a parameter: the optimizer then steps a `ParamShard` holding
part of it. Weight decay and Adam are elementwise, so that changes nothing. The full, DP-size
independent state (`full_state_dict`) is gathered per parameter, so a checkpoint saved at one
DP size loads at another (`load_full_state_dict` takes each rank's slices).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.distributed.ddp import (
    Bucket,
    DistributedDataParallel,
    ParamAndGradBuffer,
    all_gather_async,
)
from engine.optimizer.optimizer import (
    ADAM_STATE_KEYS,
    MixedPrecisionOptimizer,
    ParamShard,
    make_shard,
)


class DistributedOptimizer(MixedPrecisionOptimizer):
    """`MixedPrecisionOptimizer` whose shards are this DP rank's slices of every bucket.

    Args: as `MixedPrecisionOptimizer`; every chunk must be wrapped with
    ``DistributedDataParallelConfig(use_distributed_optimizer=True)``.
    """

    shards_over_data_parallel = True  # each DP rank owns a slice of every bucket

    def _build_shards(self) -> list[ParamShard]:
        names = {param: name for name, param in self.named_parameters()}
        self._bucket_shards: list[tuple[ParamAndGradBuffer, Bucket, list[ParamShard]]] = []
        shards = []
        for chunk in self._ddp_chunks():
            if not chunk.config.use_distributed_optimizer:
                raise ValueError(
                    "the distributed optimizer needs its model chunks wrapped with "
                    "DistributedDataParallelConfig(use_distributed_optimizer=True)"
                )
            for buffer in chunk.grad_buffers:
                for bucket in buffer.buckets:
                    mine = self._slice_bucket(buffer, bucket, names)
                    self._bucket_shards.append((buffer, bucket, mine))
                    shards += mine
        return shards

    def _ddp_chunks(self) -> list[DistributedDataParallel]:
        """The chunks, each in this package's DDP (whose buckets the slices are cut from)."""
        chunks = []
        for chunk in self.model_chunks:
            if not isinstance(chunk, DistributedDataParallel):
                raise TypeError(
                    f"the distributed optimizer needs DistributedDataParallel chunks, got "
                    f"{type(chunk).__name__}"
                )
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _slice_bucket(
        buffer: ParamAndGradBuffer, bucket: Bucket, names: dict[nn.Parameter, str]
    ) -> list[ParamShard]:
        """The pieces of ``bucket``'s parameters that fall in this rank's slice."""
        assert buffer.param_data is not None, "a buffer built with use_distributed_optimizer"
        lo = bucket.offset + bucket.dp_rank * bucket.shard_numel
        hi = lo + bucket.shard_numel
        shards = []
        for param in bucket.params:
            start, end = buffer.param_index[param]
            a, b = max(start, lo), min(end, hi)
            if a < b:
                shards.append(make_shard(
                    names[param], param, a - start, b - start,
                    buffer.param_data[a:b], buffer.grad_data[a:b],
                ))  # fmt: skip
        return shards

    def _after_step(self) -> None:
        """Share the updated slices: all-gather now, or during the next forward."""
        for chunk in self._ddp_chunks():
            chunk.start_param_sync()
            if not chunk.config.overlap_param_gather:
                chunk.finish_param_sync()

    def full_state_dict(self) -> dict[str, Any]:
        """Every parameter's float32 ``param``/``exp_avg``/``exp_avg_sq``, assembled from the
        DP slices (one all-gather per bucket and key; the result is on every DP rank)."""
        params: dict[str, dict[str, torch.Tensor]] = {}
        names = {param: name for name, param in self.named_parameters()}
        for buffer, bucket, shards in self._bucket_shards:
            lo = bucket.offset + bucket.dp_rank * bucket.shard_numel
            full = {}
            for key in ("param", *ADAM_STATE_KEYS):
                local = torch.zeros(
                    bucket.shard_numel, dtype=torch.float32, device=bucket.grad_data.device
                )
                for shard in shards:
                    start = buffer.param_index[shard.model_param][0] + shard.start - lo
                    local[start : start + shard.end - shard.start] = self._shard_state(shard)[key]
                full[key] = torch.empty(bucket.numel, dtype=torch.float32, device=local.device)
                if bucket.dp_size > 1:
                    all_gather_async(full[key], local, bucket.group).wait()
                else:
                    full[key].copy_(local)
            for param in bucket.params:
                start, end = (i - bucket.offset for i in buffer.param_index[param])
                params[names[param]] = {
                    k: v[start:end].view(param.shape).cpu() for k, v in full.items()
                }
        return self._wrap_full_state(params)

    def _step_count(self) -> int:
        # A rank whose slices are all padding holds no state; every rank steps together.
        count = torch.tensor([float(super()._step_count())])
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.model_chunks[0].data_parallel_group)
        return int(count.item())
