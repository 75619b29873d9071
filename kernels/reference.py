"""Plain PyTorch versions of the kernels: the tests' yardstick and the model's torch backend.

They define the semantics the Triton kernels must reproduce, rounding included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HuggingFace ``LlamaRMSNorm``: float32 statistics, cast to the input dtype, then weight.

    Args:
        x, residual: [..., hidden]. weight: [hidden].

    Returns:
        y [..., hidden], or (y, x + residual) when a residual is given.
    """
    summed = x if residual is None else x + residual
    s32 = summed.float()
    normed = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * normed.to(x.dtype)
    return y if residual is None else (y, summed)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] document ids -> [batch, 1, seq, seq] bool, True where attention is allowed.

    A document is a run of equal ids: a token sees only tokens of its own run.
    """
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    run = starts.long().cumsum(-1)
    return (run[:, :, None] == run[:, None, :])[:, None]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA with GQA (query head h uses K/V head h // (Hq // Hkv)) and packed documents.

    Args:
        q: [batch, Hq, Sq, D]; k, v: [batch, Hkv, Sk, D]; document_ids: [batch, S] or None.

    Returns:
        [batch, Hq, Sq, D]. Causal masks are top-left aligned (row i sees keys 0..i), as SDPA.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    mask = document_mask(document_ids)
    if is_causal:
        mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
