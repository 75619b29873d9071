"""Flash attention kernels against SDPA: outputs and dQ, dK, dV over masking edges, GQA,
causal and not, head dims, packed documents; and the errors for unsupported inputs.

The interpreter runs every program of every launch in Python, so the cases below are a covering
set (each sequence length, GQA ratio, head dim and mask kind at least once, both dtypes), not
their product, with one or two heads and batch 1-2.
"""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")

from kernels.flash_attention import (  # noqa: E402
    attention_backward,
    attention_forward,
    document_bounds,
    document_ids_from_cu_seqlens,
    flash_attn_func,
)
from kernels.flash_attention_tuning import prune_configs  # noqa: E402
from kernels.reference import attention_reference  # noqa: E402

# atol and rtol; bfloat16 keeps 8 bits of mantissa to float16's 11.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# batch, query heads, kv heads, Sq, Sk, head_dim, causal, dtype
CASES = [
    (1, 1, 1, 1, 1, 16, False, torch.float32),
    (1, 2, 2, 17, 17, 16, True, torch.float32),
    (1, 4, 1, 128, 128, 64, False, torch.float32),
    (1, 8, 1, 129, 129, 64, True, torch.float16),
    (1, 2, 1, 300, 300, 128, True, torch.float32),
    (1, 1, 1, 300, 300, 64, False, torch.float16),
    (2, 2, 2, 128, 128, 128, True, torch.float16),
    (1, 4, 1, 17, 129, 64, False, torch.float32),  # Sq < Sk
    (1, 2, 1, 129, 17, 32, True, torch.float16),  # causal, Sq > Sk: late rows see every key
    (1, 1, 1, 40, 100, 16, True, torch.float32),  # causal, Sq < Sk: top-left aligned
    (1, 1, 1, 1, 300, 256, False, torch.float16),  # one query row, widest head
]


def _case_id(case) -> str:
    b, hq, hkv, sq, sk, d, causal, dtype = case
    kind = "causal" if causal else "full"
    return f"b{b}-h{hq}/{hkv}-s{sq}x{sk}-d{d}-{kind}-{str(dtype)[6:]}"


def _random_qkv(b, hq, hkv, sq, sk, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, d))
    q, k, v = (torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes)
    do = torch.randn(b, hq, sq, d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, do


def _check_against_reference(q, k, v, do, is_causal, scale=None, document_ids=None):
    """Kernel in the inputs' dtype vs the float32 reference on the same (rounded) inputs."""
    tol = TOLERANCES[q.dtype]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, is_causal=is_causal, scale=scale, document_ids=document_ids)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_leaves, is_causal, scale, document_ids)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.float())
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert got.dtype == q.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=f"{name} differs")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_sdpa(case, device):
    b, hq, hkv, sq, sk, d, causal, dtype = case
    q, k, v, do = _random_qkv(b, hq, hkv, sq, sk, d, dtype, device)
    _check_against_reference(q, k, v, do, causal)


# bfloat16, what training runs in on GPUs, where the interpreter cannot go (numpy has no
# bfloat16): a covering set over head dims, GQA and masks, run by benchmarks/gpu_check.sh.
BF16_CASES = [
    (1, 4, 1, 129, 129, 64, True, torch.bfloat16),
    (2, 2, 2, 300, 300, 128, True, torch.bfloat16),
    (1, 2, 1, 17, 129, 128, False, torch.bfloat16),
    (1, 1, 1, 1, 300, 256, False, torch.bfloat16),
]


@pytest.mark.parametrize("case", BF16_CASES, ids=_case_id)
def test_matches_sdpa_in_bfloat16_on_the_gpu(case, device):
    if device != "cuda":
        pytest.skip("bfloat16 kernels run compiled on a GPU only (the interpreter has none)")
    b, hq, hkv, sq, sk, d, causal, dtype = case
    q, k, v, do = _random_qkv(b, hq, hkv, sq, sk, d, dtype, device)
    _check_against_reference(q, k, v, do, causal)


@pytest.mark.parametrize(
    "lengths, hq, hkv, d, causal, dtype",
    [
        ([[5, 60, 1, 63], [129]], 4, 2, 64, True, torch.float32),  # 1-token doc, one whole row
        ([[17, 100, 183]], 2, 1, 16, False, torch.float16),
        ([[1, 40, 88]], 8, 1, 32, False, torch.float32),  # GQA 8, a 1-token first doc
    ],
)
def test_packed_documents_never_attend_across(lengths, hq, hkv, d, causal, dtype, device):
    seq = sum(lengths[0])
    document_ids = torch.stack(
        [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    ).to(device=device, dtype=torch.int32)
    q, k, v, do = _random_qkv(len(lengths), hq, hkv, seq, seq, d, dtype, device, seed=1)
    _check_against_reference(q, k, v, do, causal, document_ids=document_ids)


def test_documents_match_separate_sequences(device):
    """Packing two documents gives exactly what attending to each on its own gives."""
    q, k, v, _ = _random_qkv(1, 2, 1, 50, 50, 16, torch.float32, device, seed=2)
    ids = torch.tensor([[0] * 20 + [1] * 30], dtype=torch.int32, device=device)
    packed = flash_attn_func(q, k, v, is_causal=True, document_ids=ids)
    first = flash_attn_func(q[:, :, :20], k[:, :, :20], v[:, :, :20], is_causal=True)
    second = flash_attn_func(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], is_causal=True)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=2), atol=1e-6, rtol=1e-6)


def test_custom_scale_and_strided_layout(device):
    """[batch, seq, heads, dim] activations transposed to SDPA's layout are read in place."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (
        torch.randn(1, 33, h, 32, generator=gen).to(device).transpose(1, 2) for h in (4, 2, 2, 4)
    )
    assert not q.is_contiguous()
    _check_against_reference(q, k, v, do, is_causal=True, scale=0.3)


@pytest.mark.parametrize("splits", [2, 4])
def test_dkdv_group_split_into_partial_sums(splits, device):
    """Splitting a K/V head's query heads over programs (as on a GPU with few K/V heads per
    rank) gives the same dK, dV: float32 partials reduced once."""
    q, k, v, do = _random_qkv(1, 4, 1, 40, 40, 16, torch.float16, device, seed=4)
    scale = 0.25
    o, lse = attention_forward(q, k, v, True, scale, None)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, True, scale, None, group_splits=splits)
    whole = attention_backward(do, q, k, v, o, lse, True, scale, None, group_splits=1)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(attention_reference(*leaves, True, scale), leaves, do.float())
    for got, one_program, want in zip((dq, dk, dv), whole, ref, strict=True):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got, one_program, atol=2e-3, rtol=2e-3)


def test_document_bounds():
    ids = torch.tensor([[7, 7, 3, 3, 3, 9], [0, 1, 1, 0, 0, 0]])
    start, end = document_bounds(ids)
    assert start.tolist() == [[0, 0, 2, 2, 2, 5], [0, 1, 1, 3, 3, 3]]
    assert end.tolist() == [[2, 2, 5, 5, 5, 6], [1, 3, 3, 6, 6, 6]]  # a reused id is a new run


def test_document_ids_from_cu_seqlens():
    ids = document_ids_from_cu_seqlens(torch.tensor([0, 3, 7, 10]), 12)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]]  # the padding is its own run


def test_config_pruning_drops_spilling_tiles_for_wide_heads():
    """Checked against ptxas: dK/dV with 128-key blocks and 8 warps at head dim 128 spills
    about 14 KB a thread on sm_80; 64 x 64 with 8 warps does not; at head dim 64 both fit."""
    triton = pytest.importorskip("triton")
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=3)
        for m, n, w in ((32, 128, 8), (64, 64, 8), (32, 32, 8))
    ]
    bf16 = {"Q": torch.empty(0, dtype=torch.bfloat16)}

    def kept(head_dim, kernel="dkdv", args=bf16):
        pruned = prune_configs(configs, args, kernel=kernel, HEAD_DIM=head_dim)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in pruned]

    assert kept(128) == [(64, 64, 8), (32, 32, 8)]
    assert kept(64) == [(32, 128, 8), (64, 64, 8), (32, 32, 8)]
    assert kept(256) == [(32, 32, 8)]
    fp32 = {"Q": torch.empty(0, dtype=torch.float32)}
    assert len(kept(256, "forward", fp32)) == 1  # never empty: the smallest stays


def _tensor(shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "q_shape, kv_shape, dtype, doc_shape, match",
    [
        ((1, 2, 8, 48), (1, 2, 8, 48), torch.float32, None, "power of two from 16 to 256"),
        ((1, 2, 8, 8), (1, 2, 8, 8), torch.float32, None, "power of two from 16 to 256"),
        ((1, 2, 8, 512), (1, 2, 8, 512), torch.float32, None, "power of two from 16 to 256"),
        ((2, 2, 8, 16), (1, 2, 8, 16), torch.float32, None, "batch mismatch"),
        ((1, 3, 8, 16), (1, 2, 8, 16), torch.float32, None, "multiple of key/value heads"),
        ((1, 2, 8, 16), (1, 2, 8, 32), torch.float32, None, "head_dim mismatch"),
        ((1, 2, 8, 16), (1, 2, 8, 16), torch.float64, None, "float16, bfloat16, float32"),
        ((2, 8, 16), (2, 8, 16), torch.float32, None, "batch, heads, seq, head_dim"),
        ((1, 2, 0, 16), (1, 2, 8, 16), torch.float32, None, "empty sequence"),
        ((1, 2, 8, 16), (1, 2, 9, 16), torch.float32, (1, 8), "Sq == Sk"),
        ((1, 2, 8, 16), (1, 2, 8, 16), torch.float32, (1, 7), "document_ids must be"),
    ],
)
def test_errors(q_shape, kv_shape, dtype, doc_shape, match):
    ids = torch.zeros(doc_shape, dtype=torch.int32) if doc_shape else None
    with pytest.raises(ValueError, match=match):
        flash_attn_func(_tensor(q_shape, dtype), _tensor(kv_shape, dtype), _tensor(kv_shape, dtype),
                        document_ids=ids)  # fmt: skip


def test_error_mixed_dtypes_and_float_document_ids():
    q = _tensor((1, 2, 8, 16))
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attn_func(q, q.half(), q.half())
    with pytest.raises(ValueError, match="integer tensor"):
        flash_attn_func(q, q, q, document_ids=torch.zeros(1, 8))
