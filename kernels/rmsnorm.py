"""RMSNorm in Triton, with an optional fused residual add, forward and backward.

    y = weight * cast(x * rsqrt(mean(x**2) + eps))        cast = to the input dtype (LLaMA)

The statistics are float32 whatever the input dtype; the normalised value is rounded to the
input dtype before the weight multiplies it, as in HuggingFace's ``LlamaRMSNorm``, so the
kernel and the PyTorch reference (`kernels.reference.rms_norm_reference`) round alike. With a
residual the kernel first forms ``s = x + residual`` (in the input dtype, as ``x + residual``
does), normalises ``s`` and returns ``(y, s)``; the next layer's residual stream is ``s``.

Layout (as Liger-Kernel's ``rms_norm.py``): the Triton kernels, the launchers, then the
autograd.Function and the public `rms_norm`.
"""

from __future__ import annotations

import torch

from kernels._triton import check_device, interpreting, jit, tl, triton

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HIDDEN = 65536  # one row is one register tile; beyond this it would spill


# --------------------------------------------------------------------------- Triton kernels


@jit
def _rms_norm_forward_kernel(
    X,  # [rows, hidden] input
    RESIDUAL,  # [rows, hidden] residual, read only when HAS_RESIDUAL
    Y,  # [rows, hidden] output, dtype promote(x, weight)
    SUM,  # [rows, hidden] x + residual, written only when HAS_RESIDUAL
    W,  # [hidden]
    RSTD,  # [rows] float32, 1 / rms of each row, kept for the backward
    x_row_stride,
    residual_row_stride,
    y_row_stride,
    sum_row_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program normalises one row: the row fits in registers for hidden <= 65536."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Added in the input dtype, like `x + residual`, so the stream rounds as PyTorch's.
        x += tl.load(RESIDUAL + row * residual_row_stride + cols, mask=mask, other=0.0)
        tl.store(SUM + row * sum_row_stride + cols, x, mask=mask)
    x_f32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x_f32 * x_f32, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = (x_f32 * rstd).to(X.dtype.element_ty)  # the LLaMA cast, before the weight
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@jit
def _rms_norm_backward_kernel(
    DY,  # [rows, hidden] gradient of y
    DSUM,  # [rows, hidden] gradient of the returned sum, read only when HAS_DSUM
    X,  # [rows, hidden] the normalised input (x, or x + residual)
    W,  # [hidden]
    RSTD,  # [rows] float32
    DX,  # [rows, hidden] gradient of x (and of residual: the same tensor)
    DW_PARTIAL,  # [programs, hidden] float32, one partial weight gradient per program
    dy_row_stride,
    dsum_row_stride,
    x_row_stride,
    dx_row_stride,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DSUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Each program walks a contiguous slab of rows, writing dX row by row and summing its
    share of dW in registers; the host reduces the per-program partials once (no atomics).

    With n = cast(x * rstd) and g = dy * w, the gradient through the normalisation is
    dx = rstd * (g - x * rstd**2 * mean(g * x)); the cast is treated as the identity.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: rows * stride may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        x_raw = tl.load(X + row64 * x_row_stride + cols, mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        dy = tl.load(DY + row64 * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        normed = (x * rstd).to(x_raw.dtype).to(tl.float32)  # what the forward multiplied
        dw += dy * normed
        g = dy * w
        dx = rstd * (g - x * (rstd * rstd * tl.sum(g * x, axis=0) / n_cols))
        if HAS_DSUM:
            dx += tl.load(DSUM + row64 * dsum_row_stride + cols, mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(DX + row64 * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


# --------------------------------------------------------------------------- launchers


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    """A power-of-two tile covering the row, and enough warps to keep it off local memory."""
    block = triton.next_power_of_2(n_cols)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, (1 if interpreting() else warps)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] -> [rows, hidden] with unit stride along hidden (a view when possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU, few enough that the dW partials stay small."""
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)  # the interpreter runs programs one after another


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        x, residual: [..., hidden]. weight: [hidden].

    Returns:
        y [rows, hidden] in promote(x, weight); s = x + residual [rows, hidden] or None; the
        tensor that was normalised [rows, hidden]; rstd [rows] float32.
    """
    check_device(_rms_norm_forward_kernel, x, weight, *([residual] if residual is not None else []))
    x_rows = _as_rows(x)
    n_rows, n_cols = x_rows.shape
    y = torch.empty(x_rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    residual_rows = _as_rows(residual) if residual is not None else x_rows
    summed = torch.empty_like(x_rows) if residual is not None else None
    block, warps = _block_and_warps(n_cols)
    _rms_norm_forward_kernel[(n_rows,)](
        x_rows,
        residual_rows,
        y,
        summed if summed is not None else y,  # never written without a residual
        weight,
        rstd,
        x_rows.stride(0),
        residual_rows.stride(0),
        y.stride(0),
        summed.stride(0) if summed is not None else 0,
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_N=block,
        num_warps=warps,
    )
    return y, summed, (summed if summed is not None else x_rows), rstd


def rms_norm_backward(
    dy: torch.Tensor,
    dsum: torch.Tensor | None,
    normalised: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel.

    Args:
        dy: [rows, hidden] gradient of y. dsum: [rows, hidden] gradient of x + residual, or
            None. normalised: [rows, hidden] what the forward normalised. rstd: [rows].

    Returns:
        dx [rows, hidden] in the input dtype (also the residual's gradient); dw [hidden] in
        the weight's dtype.
    """
    dy = _as_rows(dy)
    dsum = _as_rows(dsum) if dsum is not None else None
    n_rows, n_cols = normalised.shape
    programs = _backward_programs(n_rows, normalised.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    dx = torch.empty_like(normalised)
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=dy.device)
    block, warps = _block_and_warps(n_cols)
    _rms_norm_backward_kernel[(programs,)](
        dy,
        dsum if dsum is not None else dy,  # never read without a residual
        normalised,
        weight,
        rstd,
        dx,
        dw_partial,
        dy.stride(0),
        dsum.stride(0) if dsum is not None else 0,
        normalised.stride(0),
        dx.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
        HAS_DSUM=dsum is not None,
        BLOCK_N=block,
        num_warps=warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------- autograd


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x [+ residual]) * weight; returns (y, x + residual or None)."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        y, summed, normalised, rstd = rms_norm_forward(x, weight, eps, residual)
        ctx.save_for_backward(normalised, weight, rstd)
        ctx.x_shape = x.shape
        ctx.has_residual = residual is not None
        out_shape = x.shape[:-1] + y.shape[-1:]
        return y.view(out_shape), (summed.view(x.shape) if summed is not None else None)

    @staticmethod
    def backward(ctx, dy, dsum):
        normalised, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, dsum, normalised, weight, rstd)
        dx = dx.view(ctx.x_shape)
        return dx, dw, None, (dx if ctx.has_residual else None)


def _validate(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    """ValueErrors that name the offending value and what is supported."""
    if x.dtype not in _SUPPORTED_DTYPES or weight.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"rms_norm supports float32, float16 and bfloat16; got x {x.dtype}, "
            f"weight {weight.dtype}"
        )
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape [hidden] = [{x.shape[-1]}] to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if not 0 < x.shape[-1] <= _MAX_HIDDEN:
        raise ValueError(f"rms_norm supports 1..{_MAX_HIDDEN} features, got {x.shape[-1]}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x: x {tuple(x.shape)} {x.dtype}, "
            f"residual {tuple(residual.shape)} {residual.dtype}"
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable RMSNorm (LLaMA convention), optionally fused with the residual add.

    Args:
        x: [..., hidden] float32, float16 or bfloat16, on a GPU (or the CPU under
            ``TRITON_INTERPRET=1``).
        weight: [hidden].
        eps: added to the mean square before the square root.
        residual: [..., hidden] like x, or None.

    Returns:
        y [..., hidden] in promote(x.dtype, weight.dtype) without a residual; with one,
        (y, x + residual) where y normalises x + residual.
    """
    _validate(x, weight, residual)
    y, summed = RMSNormFunction.apply(x, weight, eps, residual)
    return y if residual is None else (y, summed)
