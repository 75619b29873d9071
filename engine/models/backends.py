"""The compute backends that attention and RMSNorm call, chosen by name in `ModelConfig`.

"torch" is the portable reference (scaled_dot_product_attention, an eager RMSNorm); "triton"
calls the kernels in `kernels/`, imported only when chosen so that Triton stays optional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from kernels.reference import document_mask, rms_norm_reference

AttentionFn = Callable[..., torch.Tensor]
"""``fn(q, k, v, is_causal, dropout_p=0.0, document_ids=None) -> out``; q ``[b, hq, s, d]``,
k/v ``[b, hkv, s, d]``; ``document_ids [b, s]`` (packed sequences): a token attends only
within its run of equal ids."""

NormFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``fn(x, weight, eps) -> out``; x ``[*, h]``, weight ``[h]``."""


def torch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    dropout_p: float = 0.0,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch SDPA; fewer K/V heads than query heads means grouped-query attention. With
    ``document_ids`` the causal mask is cut at document boundaries (an explicit mask: SDPA's
    math path)."""
    gqa = k.size(1) != q.size(1)
    if document_ids is None:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=gqa
        )
    mask = document_mask(document_ids)
    if is_causal:
        mask = mask & torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa
    )


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    dropout_p: float = 0.0,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    if dropout_p:
        raise ValueError("the triton attention backend has no dropout; use --attention-dropout 0")
    from kernels.flash_attention import flash_attn_func

    return flash_attn_func(q, k, v, is_causal=is_causal, document_ids=document_ids)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The PyTorch RMSNorm is the very reference the Triton kernel is tested against.
    return cast(torch.Tensor, rms_norm_reference(x, weight, eps))  # no residual: one tensor


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from kernels.rmsnorm import rms_norm

    return cast(torch.Tensor, rms_norm(x, weight, eps))  # no residual: one tensor


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"torch": torch_attention, "triton": triton_attention}
NORM_BACKENDS: dict[str, NormFn] = {"torch": torch_rms_norm, "triton": triton_rms_norm}
BACKEND_CHOICES = ("auto", *ATTENTION_BACKENDS)
"""``--attention-backend`` / ``--norm-backend``: "auto" or a backend's name."""


def resolve_backend(name: str) -> str:
    """ "auto" means Triton where it compiles for real (a CUDA device and triton installed),
    PyTorch elsewhere; explicit names pass through."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"
