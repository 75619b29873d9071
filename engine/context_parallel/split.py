"""The load-balanced split of a sequence over context-parallel (CP) ranks.

Causal attention does more work for later tokens (token i attends to i + 1 keys), so giving
rank r the r-th contiguous slice would leave the last rank with most of the work. As in
Megatron-LM and torchtitan, the sequence is cut into ``2·CP`` equal chunks and rank r holds
chunks ``r`` and ``2·CP - 1 - r``: one early, one late, the same work on every rank.

A rank's local sequence is its two chunks concatenated, ``[s/cp]`` tokens in increasing
position order, so causal attention within the local block is an ordinary causal mask.
"""

from __future__ import annotations

import torch

from engine import parallel_state

SEQUENCE_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
"""The ``[b, s]`` batch fields a CP rank keeps its chunks of."""


def chunk_length(seq_length: int, cp_size: int) -> int:
    """Tokens in one of the ``2·CP`` chunks; ValueError when the sequence does not split."""
    if seq_length % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_length} must be divisible by 2 x --context-parallel-size "
            f"({cp_size}) = {2 * cp_size}"
        )
    return seq_length // (2 * cp_size)


def local_positions(
    seq_length: int, cp_rank: int, cp_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """The positions ``[s/cp]`` (int64) of the tokens rank ``cp_rank`` holds, in local order."""
    chunk = chunk_length(seq_length, cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    late = 2 * cp_size - 1 - cp_rank
    second = torch.arange(late * chunk, (late + 1) * chunk, device=device)
    return torch.cat([first, second])


def gather_order(seq_length: int, cp_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The positions of the concatenation of every rank's local sequence, rank 0 first: the
    order an all-gather over CP returns tokens in. ``x[argsort(gather_order)]`` restores true
    order."""
    return torch.cat([local_positions(seq_length, r, cp_size, device) for r in range(cp_size)])


def split_sequence(
    x: torch.Tensor, dim: int, cp_rank: int | None = None, cp_size: int | None = None
) -> torch.Tensor:
    """This CP rank's chunks of ``x`` along ``dim`` (a view-free copy); ``cp_rank`` and
    ``cp_size`` default to the running layout's."""
    if cp_size is None:
        cp_size = parallel_state.get_context_parallel_world_size()
    if cp_rank is None:
        cp_rank = parallel_state.get_context_parallel_rank() if cp_size > 1 else 0
    if cp_size == 1:
        return x
    index = local_positions(x.size(dim), cp_rank, cp_size, x.device)
    return x.index_select(dim, index)


def sequence_major(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [b, h, s, d]`` copied (to ``dtype``) into ``[s, b, h, d]`` memory, same shape: the
    model reshapes attention outputs to ``[s, b, h·d]``, which is then a view, so the output
    projection saves the very tensor attention saved (one copy, as with SDPA's output)."""
    b, h, s, d = x.shape
    out = torch.empty((s, b, h, d), dtype=dtype or x.dtype, device=x.device)
    return out.permute(1, 2, 0, 3).copy_(x)


def split_batch(
    batch: dict[str, torch.Tensor], cp_rank: int, cp_size: int
) -> dict[str, torch.Tensor]:
    """A batch of ``[b, s]`` fields reduced to this CP rank's chunks; every rank of the CP
    group reads the same samples. ``loss_tokens`` (added here, before the split) keeps the
    whole sequence's loss-mask count, so the loss is the mean over the whole sequence;
    ``document_ids`` stay whole: attention compares every chunk's documents."""
    out = dict(batch)
    if "loss_mask" in batch:
        out["loss_tokens"] = batch["loss_mask"].sum()
    if cp_size == 1:
        return out
    for key in SEQUENCE_FIELDS:
        if key in batch:
            out[key] = split_sequence(batch[key], 1, cp_rank, cp_size)
    return out
