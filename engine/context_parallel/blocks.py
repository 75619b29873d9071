"""Attention over one block of keys that also returns the log-sum-exp, and its backward given
the merged output: the pieces ring attention (`engine.context_parallel.ring`) combines.

For queries q and one block of keys/values (k_j, v_j)::

    out_j = softmax(scale · q k_jᵀ) v_j,      lse_j = log Σ exp(scale · q k_jᵀ)   (per row)

Blocks merge exactly: ``lse = logaddexp(lse_1, lse_2)``, ``out = Σ exp(lse_j - lse) out_j``.
The backward of one block needs only the merged ``out`` and ``lse`` (the probabilities of
the block under the whole row's normalisation are ``exp(scale · q k_jᵀ - lse)``), so no block
keeps more than q, its keys and the row statistics.

Shapes: q ``[b, hq, sq, d]``, k/v ``[b, hkv, sk, d]`` (``hq`` a multiple of ``hkv``: grouped-
query attention), lse ``[b, hq, sq]`` float32 natural log. ``causal`` is the top-left aligned
mask of ``scaled_dot_product_attention`` (used here with ``sq == sk`` only); ``mask``
``[b, 1, sq, sk]`` (True: attend), for packed documents, further restricts it. A row that
attends to nothing in a block gets lse -inf and output 0, which merging ignores.

Two backends, as for ordinary attention: "torch" (plain matmuls in float32, any device) and
"triton" (the FlashAttention kernels of `kernels.flash_attention`, whose log-sum-exp is base 2).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

_LN2 = math.log(2.0)


class BlockAttention(Protocol):
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(out ``[b, hq, sq, d]`` in q's dtype, lse ``[b, hq, sq]`` float32)."""

    def backward(
        self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(dq, dk, dv) of this block under the merged ``out`` / ``lse``."""


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """K or V ``[b, hkv, s, d]`` -> ``[b, heads, s, d]``, each K/V head repeated over its
    query-head group (float32)."""
    group = heads // t.size(1)
    return (t.repeat_interleave(group, dim=1) if group > 1 else t).float()


def _scores(
    q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """float32 ``scale · q kᵀ`` ``[b, hq, sq, sk]`` of K expanded to the query heads, -inf
    above the diagonal when causal and where ``mask`` is False."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        above = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def _sum_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[b, hq, s, d]`` -> ``[b, hkv, s, d]``: each K/V head's gradient summed over the query
    heads that share it."""
    b, hq, s, d = x.shape
    return x.view(b, kv_heads, hq // kv_heads, s, d).sum(2)


class TorchBlockAttention:
    """Reference implementation: materialises the block's ``[sq, sk]`` scores (fine on CPUs
    and for tests; the Triton backend is the one for long sequences)."""

    def forward(self, q, k, v, causal, scale, mask=None):
        heads = q.size(1)
        scores = _scores(q, _expand_heads(k, heads), causal, scale, mask)
        lse = torch.logsumexp(scores, dim=-1)
        # A row with no key here (a document elsewhere) has lse -inf: probabilities 0.
        probs = torch.exp(scores - lse.masked_fill(lse.isinf(), 0.0).unsqueeze(-1))
        return torch.matmul(probs, _expand_heads(v, heads)).to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, causal, scale, mask=None):
        heads = q.size(1)
        k_rep, v_rep = _expand_heads(k, heads), _expand_heads(v, heads)
        probs = torch.exp(_scores(q, k_rep, causal, scale, mask) - lse.unsqueeze(-1))
        do = dout.float()
        dv = torch.matmul(probs.transpose(-1, -2), do)
        dp = torch.matmul(do, v_rep.transpose(-1, -2))
        delta = (do * out.float()).sum(-1, keepdim=True)
        ds = probs * (dp - delta)
        dq = torch.matmul(ds, k_rep) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
        return dq, _sum_groups(dk, k.size(1)), _sum_groups(dv, k.size(1))


class TritonBlockAttention:
    """The FlashAttention kernels (no ``[sq, sk]`` matrix); their lse is in units of log2.
    They mask documents only where queries and keys are the same positions (``sq == sk``), so
    they take no cross-block ``mask``."""

    def forward(self, q, k, v, causal, scale, mask=None):
        from kernels.flash_attention import attention_forward

        _refuse_mask(mask)
        out, lse2 = attention_forward(*(t.contiguous() for t in (q, k, v)), causal, scale, None)
        return out, lse2 * _LN2

    def backward(self, dout, q, k, v, out, lse, causal, scale, mask=None):
        from kernels.flash_attention import attention_backward

        _refuse_mask(mask)
        tensors = (t.contiguous() for t in (dout, q, k, v, out))
        return attention_backward(*tensors, (lse / _LN2).contiguous(), causal, scale, None)


def _refuse_mask(mask: torch.Tensor | None) -> None:
    if mask is not None:
        raise ValueError(
            "ring attention over packed documents needs the torch attention backend (the "
            "Triton kernels mask documents only within one block of positions): use "
            "--attention-backend torch or --cp-comm-type a2a"
        )


BLOCK_BACKENDS: dict[str, BlockAttention] = {
    "torch": TorchBlockAttention(),
    "triton": TritonBlockAttention(),
}


def merge_block(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Fold one block's (out, lse) into the running float32 (out, lse) of the same rows."""
    if out is None or lse is None:
        return block_out.float(), block_lse
    merged = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - merged).unsqueeze(-1)
    out = out + block_out.float() * torch.exp(block_lse - merged).unsqueeze(-1)
    return out, merged
