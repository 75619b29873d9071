"""All-to-all (Ulysses) context parallelism: attention heads scattered over the CP group and
the sequence gathered around attention.

Before attention, one all-to-all turns each rank's ``[b, h, s/cp, d]`` (all heads, its two
chunks) into ``[b, h/cp, s, d]`` (its share of the heads, the whole sequence); attention then
runs unchanged, with any backend, and a second all-to-all turns the output back. Each of the
four all-to-alls (q, k, v, out) moves ``(cp-1)/cp`` of its tensor. Heads must split evenly:
query heads and K/V heads per TP rank both divisible by CP (checked up front by
`engine.models.config.context_parallel_errors`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.context_parallel.split import gather_order, sequence_major


def _all_to_all(
    x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int
) -> torch.Tensor:
    """Piece i of ``x`` along ``scatter_dim`` goes to rank i; the pieces received are joined
    along ``gather_dim`` in rank order."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def _heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[b, h, s/cp, d]`` (this rank's chunks) -> ``[b, h/cp, s, d]`` in position order."""
    gathered = _all_to_all(x, group, scatter_dim=1, gather_dim=2)
    order = gather_order(gathered.size(2), dist.get_world_size(group), x.device)
    return gathered.index_select(2, torch.argsort(order))


def _sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse: ``[b, h/cp, s, d]`` in position order -> ``[b, h, s/cp, d]``, in the
    ``[s, b, h, d]`` memory layout the model reshapes attention outputs from."""
    order = gather_order(x.size(2), dist.get_world_size(group), x.device)
    return sequence_major(_all_to_all(x.index_select(2, order), group, scatter_dim=2, gather_dim=1))


class _Reshard(torch.autograd.Function):
    """`_heads_to_sequence` (``to_sequence``) or `_sequence_to_heads`; the backward is the
    other one. Nothing is saved: the reordering is recomputed from the shape."""

    @staticmethod
    def forward(ctx, x, group, to_sequence: bool):
        ctx.group, ctx.to_sequence = group, to_sequence
        return (_heads_to_sequence if to_sequence else _sequence_to_heads)(x, group)

    @staticmethod
    def backward(ctx, grad):
        inverse = _sequence_to_heads if ctx.to_sequence else _heads_to_sequence
        return inverse(grad, ctx.group), None, None


def all_to_all_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_fn: Callable[..., torch.Tensor],
    group: dist.ProcessGroup,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention with heads scattered over the CP group.

    q ``[b, hq, s/cp, d]``, k/v ``[b, hkv, s/cp, d]`` (this rank's two chunks, load-balanced
    order) -> ``[b, hq, s/cp, d]``. ``attention_fn(q, k, v, is_causal=True, document_ids=)``
    is the model's attention backend (`engine.models.backends.AttentionFn`); it applies
    ``document_ids [b, s]`` (the whole sequence's, packed documents) to the gathered sequence
    as without CP.
    """
    size = dist.get_world_size(group)
    if q.size(1) % size or k.size(1) % size:
        raise ValueError(
            f"all-to-all attention scatters heads over the {size} CP ranks: {q.size(1)} query "
            f"and {k.size(1)} K/V heads per rank must be divisible by {size}; use ring attention"
        )
    gathered = (_Reshard.apply(t, group, True) for t in (q, k, v))
    out = attention_fn(*gathered, is_causal=True, document_ids=document_ids)
    return _Reshard.apply(out, group, False)
