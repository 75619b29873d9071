"""RMSNorm kernel against the PyTorch reference: outputs, dX, dW, the fused residual add."""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")

from kernels.reference import rms_norm_reference  # noqa: E402
from kernels.rmsnorm import rms_norm  # noqa: E402

# (atol, rtol) per dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 2e-2),
}


def _inputs(shape, dtype, device, residual: bool, weight_dtype=None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(weight_dtype or dtype)
    res = torch.randn(shape, generator=gen).to(dtype) if residual else None
    dy = torch.randn(shape, generator=gen)
    tensors = [t.to(device) if t is not None else None for t in (x, weight, res, dy)]
    return [t.requires_grad_() if t is not None and i < 3 else t for i, t in enumerate(tensors)]


def _run(fn, x, weight, res, dy, eps):
    """Forward, backward with a fixed upstream gradient, return outputs and gradients."""
    out = fn(x, weight, eps, res)
    y, summed = out if res is not None else (out, None)
    loss = (y.float() * dy).sum()
    if summed is not None:  # the residual stream has its own downstream gradient
        loss = loss + (summed.float() * dy.flip(-1)).sum()
    loss.backward()
    grads = [t.grad for t in (x, weight, res) if t is not None]
    for t in (x, weight, res):
        if t is not None:
            t.grad = None
    return y, summed, grads


@pytest.mark.parametrize(
    "shape, dtype, residual",
    [
        ((2, 123), torch.float32, False),
        ((3, 5, 64), torch.float32, True),
        ((7, 1000), torch.float32, False),
        ((2, 3, 123), torch.float16, False),
        ((4, 256), torch.float16, True),
        pytest.param((3, 200), torch.bfloat16, True),
        ((1, 1), torch.float32, False),
    ],
)
def test_matches_reference(shape, dtype, residual, device):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("Triton's interpreter does bfloat16 arithmetic on raw bits; GPU only")
    x, weight, res, dy = _inputs(shape, dtype, device, residual)
    y, summed, grads = _run(rms_norm, x, weight, res, dy, 1e-6)
    y_ref, summed_ref, grads_ref = _run(rms_norm_reference, x, weight, res, dy, 1e-6)
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    if residual:
        torch.testing.assert_close(summed, summed_ref, atol=0, rtol=0)  # same rounding
    assert len(grads) == len(grads_ref) == (3 if residual else 2)
    for name, got, want in zip(("dx", "dw", "dresidual"), grads, grads_ref, strict=False):
        scale = want.abs().max().item()  # dW sums over rows: compare relative to its size
        torch.testing.assert_close(
            got, want, atol=atol * max(1.0, scale), rtol=rtol, msg=f"{name} differs"
        )


def test_float32_weight_with_half_input_promotes_like_reference(device):
    x, weight, _, dy = _inputs((4, 96), torch.float16, device, False, weight_dtype=torch.float32)
    y, _, (dx, dw) = _run(rms_norm, x, weight, None, dy, 1e-5)
    y_ref, _, (dx_ref, dw_ref) = _run(rms_norm_reference, x, weight, None, dy, 1e-5)
    assert y.dtype == torch.float32 and dw.dtype == torch.float32 and dx.dtype == torch.float16
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dw, dw_ref, atol=1e-3, rtol=1e-3)


def test_non_contiguous_rows(device):
    """A strided view (every other row) normalises the same as its contiguous copy."""
    x = torch.randn(8, 3, 48, device=device)[:, 1]
    weight = torch.randn(48, device=device)
    torch.testing.assert_close(rms_norm(x, weight), rms_norm_reference(x, weight))


@pytest.mark.parametrize(
    "x_shape, w_shape, x_dtype, res_shape, match",
    [
        ((2, 8), (7,), torch.float32, None, "weight must have shape"),
        ((2, 8), (8,), torch.float64, None, "float32, float16 and bfloat16"),
        ((2, 8), (8,), torch.float32, (2, 4), "residual must match"),
        ((2, 0), (0,), torch.float32, None, "features"),
    ],
)
def test_errors(x_shape, w_shape, x_dtype, res_shape, match, device):
    x = torch.zeros(x_shape, dtype=x_dtype, device=device)
    weight = torch.ones(w_shape, dtype=x_dtype, device=device)
    residual = torch.zeros(res_shape, device=device) if res_shape else None
    with pytest.raises(ValueError, match=match):
        rms_norm(x, weight, 1e-6, residual)
