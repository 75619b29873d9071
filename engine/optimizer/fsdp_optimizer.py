"""The optimizer over FSDP2's parameter shards (``--use-torch-fsdp2``).

With `engine.distributed.fsdp.FullyShardedDataParallel` every parameter is a DTensor whose
local tensor is this DP rank's rows of it. Those rows are the main parameters: float32 sharded
weights that AdamW steps in place, with the DP-averaged gradient shard FSDP reduce-scattered.
So optimizer state, weights and gradients all shrink by the DP size. Everything else is
`MixedPrecisionOptimizer`'s: unscaling, inf checks, the global gradient norm (summed over DP as
well, each rank holding different rows), clipping.
"""

from __future__ import annotations

from engine.distributed.fsdp import local_rows
from engine.optimizer.optimizer import MixedPrecisionOptimizer, ParamShard, make_shard


class FullyShardedOptimizer(MixedPrecisionOptimizer):
    """`MixedPrecisionOptimizer` whose shards are this rank's rows of FSDP's parameters.

    Args: as `MixedPrecisionOptimizer`; the chunks are `FullyShardedDataParallel`.
    """

    shards_over_data_parallel = True  # each DP rank holds other rows

    def _build_shards(self) -> list[ParamShard]:
        shards = []
        for name, param in self.named_parameters():
            rows, start, end = local_rows(param)
            main_grad = param.main_grad  # type: ignore[attr-defined]
            shards.append(make_shard(name, param, start, end, rows, main_grad.view(-1)))
        return shards
