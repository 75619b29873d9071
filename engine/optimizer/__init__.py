"""AdamW with float32 main parameters (fp32 / bf16 / fp16 with loss scaling), gradient
clipping by the global norm, and learning-rate / weight-decay schedules."""

from __future__ import annotations

from collections.abc import Sequence

from engine.distributed import DataParallelChunk
from engine.optimizer.clip_grads import clip_grads_by_total_norm, get_grad_norm_fp32
from engine.optimizer.config import OptimizerConfig
from engine.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from engine.optimizer.lr_schedule import OptimizerParamScheduler, build_lr_scheduler
from engine.optimizer.optimizer import MixedPrecisionOptimizer, StepResult


def build_optimizer(
    config: OptimizerConfig, model_chunks: Sequence[DataParallelChunk]
) -> MixedPrecisionOptimizer:
    """The optimizer for ``model_chunks`` (wrapped in DistributedDataParallel): distributed
    (ZeRO-1) when the chunks were wrapped with ``use_distributed_optimizer``, over FSDP2's
    shards when they are `FullyShardedDataParallel` (``use_torch_fsdp2``)."""
    if all(chunk.config.use_torch_fsdp2 for chunk in model_chunks):
        from engine.optimizer.fsdp_optimizer import FullyShardedOptimizer

        return FullyShardedOptimizer(config, model_chunks)
    sharded = {chunk.config.use_distributed_optimizer for chunk in model_chunks}
    if len(sharded) > 1:
        raise ValueError(
            "model chunks disagree on --use-distributed-optimizer: wrap every chunk with the "
            "same DistributedDataParallelConfig"
        )
    if sharded == {True}:
        # Imported here: engine.optimizer.distributed_optimizer builds on this package.
        from engine.optimizer.distributed_optimizer import DistributedOptimizer

        return DistributedOptimizer(config, model_chunks)
    return MixedPrecisionOptimizer(config, model_chunks)


__all__ = [
    "ConstantGradScaler",
    "DynamicGradScaler",
    "MixedPrecisionOptimizer",
    "OptimizerParamScheduler",
    "StepResult",
    "build_lr_scheduler",
    "build_optimizer",
    "clip_grads_by_total_norm",
    "get_grad_norm_fp32",
]
