"""How a tensor-parallel parameter maps to its full tensor, both ways.

A parameter marked by the parallel layers (``tensor_model_parallel``, ``partition_dim``,
``partition_sizes``) holds, along ``partition_dim``, this rank's chunk of each block of the full
tensor, concatenated: for a fused Q|K|V projection that is ``[q_r | k_r | v_r]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def whole_over_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP2 parameter's (a DTensor's) rows from every DP rank: its whole TP-local tensor
    (collective over its DP group); any other tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return tensor if full_tensor is None else full_tensor()


def rows_over_data_parallel(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (a TP-local tensor) laid out as ``like``: for an FSDP2 parameter, a DTensor of
    this DP rank's rows of it (sliced here, no communication); else ``full`` itself."""
    mesh = getattr(like, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, mesh, like.placements, src_data_rank=None)  # type: ignore[attr-defined]


def shard_pieces(
    full: torch.Tensor, partition_dim: int, partition_sizes: Sequence[int], rank: int, world: int
) -> list[torch.Tensor]:
    """This rank's pieces of ``full``, in order: chunk ``rank`` of every block (views)."""
    blocks = full.split(list(partition_sizes), dim=partition_dim)
    return [block.chunk(world, dim=partition_dim)[rank] for block in blocks]


def shard_tensor(
    full: torch.Tensor, partition_dim: int, partition_sizes: Sequence[int], rank: int, world: int
) -> torch.Tensor:
    """This rank's shard of ``full``: its `shard_pieces`, concatenated."""
    return torch.cat(shard_pieces(full, partition_dim, partition_sizes, rank, world), partition_dim)


def gather_tensor(
    local: torch.Tensor,
    partition_dim: int,
    partition_sizes: Sequence[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """The full tensor from every rank's shard (collective over ``group``)."""
    world = dist.get_world_size(group)
    if world == 1:
        return local.clone()
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local.contiguous(), group=group)
    return unshard_tensor(shards, partition_dim, partition_sizes)


def unshard_tensor(
    shards: Sequence[torch.Tensor], partition_dim: int, partition_sizes: Sequence[int]
) -> torch.Tensor:
    """The full tensor from every rank's shard, in rank order (the inverse of `shard_tensor`,
    without communication)."""
    world = len(shards)
    local_sizes = [size // world for size in partition_sizes]
    per_rank_blocks = [shard.split(local_sizes, dim=partition_dim) for shard in shards]
    blocks = [
        torch.cat([blocks[i] for blocks in per_rank_blocks], dim=partition_dim)
        for i in range(len(partition_sizes))
    ]
    return torch.cat(blocks, dim=partition_dim)
