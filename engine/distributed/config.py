"""How gradients are reduced over the data-parallel group: `DistributedDataParallelConfig`,
the configuration of `engine.distributed.ddp` (Megatron-Core's DDP config, same flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistributedDataParallelConfig:
    """How gradients are reduced over the data-parallel group (`engine.distributed.ddp`)."""

    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in float32 whatever the parameters' dtype
    (``--accumulate-allreduce-grads-in-fp32``; on by default here, as Megatron forces for bf16)."""
    overlap_grad_reduce: bool = False
    """Launch each bucket's reduction as soon as its gradients are ready in the last
    microbatch's backward (``--overlap-grad-reduce``)."""
    use_distributed_optimizer: bool = False
    """ZeRO-1: reduce-scatter gradients, shard optimizer state (``--use-distributed-optimizer``)."""
    overlap_param_gather: bool = False
    """Distributed optimizer: all-gather updated parameters during the next forward
    (``--overlap-param-gather``)."""
    bucket_size: int | None = 40_000_000
    """Elements per gradient bucket (``--ddp-bucket-size``); None puts everything in one."""
    use_torch_fsdp2: bool = False
    """Shard weights, gradients and optimizer state over DP with PyTorch's FSDP2
    (``--use-torch-fsdp2``, `engine.distributed.fsdp`) instead of this package's DDP."""
    fsdp_reduce_every_microbatch: bool = False
    """FSDP2: reduce-scatter gradients after every microbatch's backward, keeping them sharded
    (``--fsdp-reduce-every-microbatch``): less memory (no unsharded gradients held across the
    microbatches of a step) for one reduce-scatter per microbatch instead of per step."""

    def errors(self) -> list[str]:
        """What is wrong with these options, each naming its flag."""
        errors = []
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            errors.append("--overlap-param-gather needs --use-distributed-optimizer")
        if self.fsdp_reduce_every_microbatch and not self.use_torch_fsdp2:
            errors.append("--fsdp-reduce-every-microbatch needs --use-torch-fsdp2")
        if self.use_torch_fsdp2:
            for flag, on in (("--use-distributed-optimizer", self.use_distributed_optimizer),
                             ("--overlap-param-gather", self.overlap_param_gather)):  # fmt: skip
                if on:
                    errors.append(
                        f"--use-torch-fsdp2 shards the optimizer state itself: drop {flag}"
                    )
        if self.bucket_size is not None and self.bucket_size < 1:
            errors.append(f"--ddp-bucket-size must be positive, got {self.bucket_size}")
        return errors
