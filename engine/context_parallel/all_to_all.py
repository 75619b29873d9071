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

from engine.context_parallel.split import gather_order


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


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def all_to_all_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_fn: Callable[..., torch.Tensor],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """Causal attention with heads scattered over the CP group.

    q ``[b, hq, s/cp, d]``, k/v ``[b, hkv, s/cp, d]`` (this rank's two chunks, load-balanced
    order) -> ``[b, hq, s/cp, d]``. ``attention_fn(q, k, v, is_causal=True)`` is the model's
    attention backend.
    """
    size = dist.get_world_size(group)
    seq = q.size(2) * size
    gathered = gather_order(seq, size, q.device)  # position of each gathered token
    to_true = torch.argsort(gathered)

    def heads_to_sequence(x: torch.Tensor) -> torch.Tensor:
        return _AllToAll.apply(x, group, 1, 2).index_select(2, to_true)

    out = attention_fn(*(heads_to_sequence(t) for t in (q, k, v)), is_causal=True)
    return _AllToAll.apply(out.index_select(2, gathered), group, 2, 1)
