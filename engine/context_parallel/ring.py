"""Ring attention: causal self-attention over a sequence split across the CP group.

Each rank holds two chunks of the load-balanced split (`engine.context_parallel.split`) and its
queries, keys and values for them (``[b, h, 2c, d]``, chunk ``r`` then chunk ``2·CP-1-r``).
K/V blocks travel around the ring (rank r sends to r + 1) for ``CP - 1`` hops; while one
hop is in flight (``batch_isend_irecv``) the rank computes attention against the block it
already has, and folds the result into its running output with the block's log-sum-exp
(`engine.context_parallel.blocks`).

Which (query, key) chunks a step pairs is fixed by positions (`ring_steps`):

- step 0, its own block: causal over the local sequence (its two chunks are in order);
- a block from an earlier rank (source < r): both local chunks attend to the block's early
  chunk, unmasked (the block's late chunk lies after both);
- a block from a later rank (source > r): only the local late chunk attends, to both of the
  block's chunks, unmasked (the local early chunk lies before both).

Every step is ``2c²`` (query, key) pairs (step 0 adds the ``c`` diagonal), so causal work is the
same on every rank. The backward runs the ring again: K/V travel as in the forward, and the
dK/dV accumulator of each block travels with it, collecting every rank's contribution, and
arrives back at its owner after the last hop. dK/dV accumulate and travel in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.context_parallel.blocks import BlockAttention, merge_block
from engine.context_parallel.split import local_positions, sequence_major

_KV_TAG, _DKV_TAG = 0, 1  # two exchanges may be in flight at once between the same peers


@dataclass(frozen=True)
class RingStep:
    """One step of a rank's ring: the block it attends to, and which part of it."""

    source: int
    """CP rank whose K/V block this step uses."""
    late_queries_only: bool
    """Only the local late chunk attends (the block comes from a later rank)."""
    early_keys_only: bool
    """Only the block's early chunk is attended to (the block comes from an earlier rank)."""
    causal: bool
    """The block is the rank's own: causal over the local sequence."""

    def pairs(self, chunk: int) -> int:
        """(query, key) pairs this step computes per head and sequence, ``chunk`` tokens per
        chunk: the attention FLOPs are ``4·d`` times this (``2·d`` forward each for scores and
        values)."""
        rows = chunk if self.late_queries_only else 2 * chunk
        cols = chunk if self.early_keys_only else 2 * chunk
        return rows * (rows + 1) // 2 if self.causal else rows * cols


def ring_steps(cp_rank: int, cp_size: int) -> list[RingStep]:
    """The steps rank ``cp_rank`` of ``cp_size`` runs, in order (the block of step i comes
    from rank ``cp_rank - i``)."""
    steps = []
    for step in range(cp_size):
        source = (cp_rank - step) % cp_size
        steps.append(
            RingStep(
                source=source,
                late_queries_only=step > 0 and source > cp_rank,
                early_keys_only=step > 0 and source < cp_rank,
                causal=step == 0,
            )
        )
    return steps


def _step_mask(
    document_ids: torch.Tensor | None, step: RingStep, rank: int, size: int, chunk: int
) -> torch.Tensor | None:
    """Packed documents: ``[b, 1, sq, sk]`` True where the step's query and key are in the same
    document, from the whole sequence's ``document_ids [b, s]`` (ids increase along it)."""
    if document_ids is None:
        return None
    seq = document_ids.size(1)
    queries = document_ids[:, local_positions(seq, rank, size, document_ids.device)]
    keys = document_ids[:, local_positions(seq, step.source, size, document_ids.device)]
    queries = queries[:, chunk:] if step.late_queries_only else queries
    keys = keys[:, :chunk] if step.early_keys_only else keys
    return (queries[:, :, None] == keys[:, None, :]).unsqueeze(1)


def _exchange(
    tensor: torch.Tensor, group: dist.ProcessGroup, tag: int
) -> tuple[torch.Tensor, list]:
    """Start sending ``tensor`` to the next rank of the ring and receiving the previous rank's
    into a new buffer; returns (buffer, requests to wait on)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    following = dist.get_global_rank(group, (rank + 1) % size)
    preceding = dist.get_global_rank(group, (rank - 1) % size)
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, following, group, tag),
        dist.P2POp(dist.irecv, received, preceding, group, tag),
    ]
    return received, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, block: BlockAttention, group: dist.ProcessGroup,
                document_ids: torch.Tensor | None):  # fmt: skip
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        chunk = q.size(2) // 2
        kv = torch.stack([k, v])  # [2, b, hkv, 2c, d]: one message per hop
        # Running (out, lse) of the local early and late chunk.
        early: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        late: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        for i, step in enumerate(ring_steps(rank, size)):
            if i + 1 < size:
                incoming, requests = _exchange(kv, group, _KV_TAG)
            keys = kv[:, :, :, :chunk] if step.early_keys_only else kv
            queries = q[:, :, chunk:] if step.late_queries_only else q
            mask = _step_mask(document_ids, step, rank, size, chunk)
            out, lse = block.forward(queries, keys[0], keys[1], step.causal, scale, mask)
            if step.late_queries_only:
                late = merge_block(late[0], late[1], out, lse)
            else:
                early = merge_block(early[0], early[1], out[:, :, :chunk], lse[..., :chunk])
                late = merge_block(late[0], late[1], out[:, :, chunk:], lse[..., chunk:])
            if i + 1 < size:
                _wait(requests)
                kv = incoming
        (out_early, lse_early), (out_late, lse_late) = early, late
        # Step 0 (the rank's own block) covers every row.
        assert out_early is not None and out_late is not None
        assert lse_early is not None and lse_late is not None
        out = sequence_major(torch.cat([out_early, out_late], dim=2), q.dtype)
        lse = torch.cat([lse_early, lse_late], dim=-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.block, ctx.group = scale, block, group
        ctx.document_ids = document_ids  # integers: no gradient, not a saved activation
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, block, scale = ctx.group, ctx.block, ctx.scale
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        chunk = q.size(2) // 2
        kv = torch.stack([k, v])
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv_incoming, dkv_requests = dq, []  # set by the first step's exchange
        for i, step in enumerate(ring_steps(rank, size)):
            if i + 1 < size:
                incoming, kv_requests = _exchange(kv, group, _KV_TAG)
            rows = slice(chunk, None) if step.late_queries_only else slice(None)
            keys = kv[:, :, :, :chunk] if step.early_keys_only else kv
            dq_block, dk_block, dv_block = block.backward(
                dout[:, :, rows], q[:, :, rows], keys[0], keys[1], out[:, :, rows],
                lse[..., rows], step.causal, scale,
                _step_mask(ctx.document_ids, step, rank, size, chunk),
            )  # fmt: skip
            dq[:, :, rows] += dq_block
            if i == 0:
                dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            else:
                _wait(dkv_requests)  # this block's accumulator, from the previous rank
                dkv = dkv_incoming
            cols = slice(None, chunk) if step.early_keys_only else slice(None)
            dkv[0][:, :, cols] += dk_block
            dkv[1][:, :, cols] += dv_block
            # After the last step this hop takes the accumulator home to its owner.
            dkv_incoming, dkv_requests = _exchange(dkv, group, _DKV_TAG)
            if i + 1 < size:
                _wait(kv_requests)
                kv = incoming
        _wait(dkv_requests)
        dk, dv = dkv_incoming[0].to(k.dtype), dkv_incoming[1].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: BlockAttention,
    group: dist.ProcessGroup,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole split sequence.

    q ``[b, hq, 2c, d]``, k/v ``[b, hkv, 2c, d]`` (this rank's two chunks) -> ``[b, hq, 2c, d]``.
    ``document_ids [b, s]``: packed documents of the whole sequence (not split; ids increase
    along it), attention stays within each.
    """
    scale = q.size(-1) ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, scale, block, group, document_ids)
