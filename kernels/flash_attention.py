"""FlashAttention-2 in Triton: causal or not, grouped-query, packed documents, forward + backward.

    O = softmax(scale * Q K^T + mask) V        Q [B, Hq, Sq, D], K/V [B, Hkv, Sk, D]

Forward: one program per (query block, batch x query head) streams over key blocks with the
online softmax (Dao 2023), in the base-2 domain so each exponential is one ``exp2``; it stores
O and, per row, the base-2 log-sum-exp ``lse = max + log2(sum)`` so the backward can rebuild
any probability tile as ``exp2(scale*log2(e) * q.k - lse)``. The S x S matrix never exists.

Backward: a preprocessing kernel forms ``delta = rowsum(dO * O)``; a dK/dV kernel per key block
(and K/V head) loops over the query heads of its group and their query blocks, so grouped-query
gradients are summed in registers, never by repeating K/V; a dQ kernel per query block loops
over key blocks. No atomics anywhere, so results do not depend on scheduling.

Masks: rows and keys past the sequence ends, causal (top-left aligned as in
``scaled_dot_product_attention``: row i sees keys 0..i, also when Sq != Sk) and documents. A
document is a run of equal ``document_ids``; each row gets the key range [start, end) of its run,
and whole blocks outside every row's range are skipped.

Layout (as Liger-Kernel): Triton kernels, launchers, autograd.Function, public function.
"""

from __future__ import annotations

import math

import torch

from kernels._triton import autotune, check_device, interpreting, jit, tl, triton
from kernels.flash_attention_tuning import tuning

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2_E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))


# --------------------------------------------------------------------------- Triton kernels


@jit
def _mask(q_idx, k_idx, seq_q, seq_k, doc_start, doc_end, IS_CAUSAL: tl.constexpr,
          HAS_DOCS: tl.constexpr):  # fmt: skip
    """Allowed (query, key) pairs; q_idx/doc_* and k_idx broadcast to one tile."""
    allowed = (q_idx < seq_q) & (k_idx < seq_k)
    if IS_CAUSAL:
        allowed &= k_idx <= q_idx
    if HAS_DOCS:
        allowed &= (k_idx >= doc_start) & (k_idx < doc_end)
    return allowed


@jit
def _needs_mask(m_start, n_start, seq_q, seq_k, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Whether the tile of query block m_start and key block n_start masks any pair; interior
    tiles (most of them for long sequences) skip the masking arithmetic."""
    edge = (m_start + BLOCK_M > seq_q) | (n_start + BLOCK_N > seq_k) | HAS_DOCS
    if IS_CAUSAL:
        edge |= n_start + BLOCK_N - 1 > m_start  # some key of the tile lies after some row
    return edge


@jit
def _row_documents(DOC_START, DOC_END, rows, row_ok, HAS_DOCS: tl.constexpr):
    """Per-row key range [start, end) of the row's document; zeros without documents."""
    if HAS_DOCS:
        start = tl.load(DOC_START + rows, mask=row_ok, other=0)
        end = tl.load(DOC_END + rows, mask=row_ok, other=0)
    else:
        start = tl.zeros_like(rows)
        end = tl.zeros_like(rows)
    return start, end


@jit
def _key_range(m_start, seq_q, seq_k, DOC_START, DOC_END, IS_CAUSAL: tl.constexpr,
               HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """[lo, hi): the keys any row of the query block [m_start, m_start + BLOCK_M) may see."""
    lo = 0
    hi = seq_k
    if IS_CAUSAL:
        hi = tl.minimum(hi, m_start + BLOCK_M)
    if HAS_DOCS:  # runs are contiguous: first row's run start .. last row's run end
        lo = tl.load(DOC_START + m_start)
        hi = tl.minimum(hi, tl.load(DOC_END + tl.minimum(m_start + BLOCK_M, seq_q) - 1))
    return (lo // BLOCK_N) * BLOCK_N, hi


@jit
def _query_range(n_start, seq_q, seq_k, DOC_START, DOC_END, IS_CAUSAL: tl.constexpr,
                 HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """[lo, hi): the query rows that may see some key of the block [n_start, n_start + BLOCK_N)."""
    lo = 0
    hi = seq_q
    if IS_CAUSAL:
        lo = n_start
    if HAS_DOCS:  # documents need Sq == Sk, so key positions index the same runs
        lo = tl.maximum(lo, tl.load(DOC_START + n_start))
        hi = tl.minimum(hi, tl.load(DOC_END + tl.minimum(n_start + BLOCK_N, seq_k) - 1))
    return (lo // BLOCK_M) * BLOCK_M, hi


@autotune(**tuning("forward"))
@jit
def _attention_forward_kernel(
    Q, K, V, OUT, LSE,  # LSE [B, Hq, Sq] float32, base 2
    DOC_START, DOC_END,  # [B, S] int32 run bounds, read only when HAS_DOCS
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    heads_q, seq_q, seq_k, group, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Sq, BLOCK_M), B * Hq): one query block of one head."""
    m_start = tl.program_id(0) * BLOCK_M
    batch = tl.program_id(1) // heads_q
    head = tl.program_id(1) % heads_q
    kv_head = head // group  # grouped-query: `group` query heads share one K/V head
    Q += batch.to(tl.int64) * stride_qb + head * stride_qh
    K += batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    V += batch.to(tl.int64) * stride_vb + kv_head * stride_vh
    DOC_START += batch.to(tl.int64) * seq_q
    DOC_END += batch.to(tl.int64) * seq_q

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    doc_start, doc_end = _row_documents(DOC_START, DOC_END, offs_m, row_ok, HAS_DOCS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, hi = _key_range(m_start, seq_q, seq_k, DOC_START, DOC_END, IS_CAUSAL, HAS_DOCS,
                        BLOCK_M, BLOCK_N)  # fmt: skip
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + offs_n
        k_t = tl.load(K + cols[None, :] * stride_ks + offs_d[:, None], mask=cols[None, :] < seq_k,
                      other=0.0)  # fmt: skip
        v = tl.load(V + cols[:, None] * stride_vs + offs_d[None, :], mask=cols[:, None] < seq_k,
                    other=0.0)  # fmt: skip
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if _needs_mask(m_start, n_start, seq_q, seq_k, IS_CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N):
            allowed = _mask(offs_m[:, None], cols[None, :], seq_q, seq_k, doc_start[:, None],
                            doc_end[:, None], IS_CAUSAL, HAS_DOCS)  # fmt: skip
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row whose keys so far are all masked keeps max -inf; subtract 0 there, not -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows have no key at all
    OUT += batch.to(tl.int64) * stride_ob + head * stride_oh
    out = (acc / l_safe[:, None]).to(OUT.dtype.element_ty)
    tl.store(OUT + offs_m[:, None] * stride_os + offs_d[None, :], out, mask=row_ok[:, None])
    LSE += (batch.to(tl.int64) * heads_q + head) * seq_q
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@jit
def _attention_backward_preprocess_kernel(
    OUT, DO, DELTA,  # DELTA [B, Hq, Sq] float32
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    heads_q, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O): the softmax backward's per-row term, computed once."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    batch = tl.program_id(1) // heads_q
    head = tl.program_id(1) % heads_q
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None]
    row_ok = rows < seq_q
    o = tl.load(OUT + batch.to(tl.int64) * stride_ob + head * stride_oh + rows * stride_os
                + offs_d[None, :], mask=row_ok, other=0.0)  # fmt: skip
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + head * stride_doh + rows * stride_dos
                 + offs_d[None, :], mask=row_ok, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + (batch.to(tl.int64) * heads_q + head) * seq_q + offs_m, delta,
             mask=offs_m < seq_q)  # fmt: skip


@autotune(**tuning("dkdv"))
@jit
def _attention_backward_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dk_split, stride_dkb, stride_dkh, stride_dks,
    stride_dv_split, stride_dvb, stride_dvh, stride_dvs,
    heads_q, heads_kv, seq_q, seq_k, group, group_splits, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Sk, BLOCK_N), B * Hkv * group_splits): dK, dV of one key block, summed over
    the query heads of the group, or over 1/group_splits of them into partial sums [split, ...].

    Works on transposed tiles (keys x queries) so K and V stay in registers:
    p^T = exp2(k q^T * qk_scale - lse), dV += p^T dO, dS^T = p^T (V dO^T - delta), dK += dS^T q.
    """
    n_start = tl.program_id(0) * BLOCK_N
    split = tl.program_id(1) % group_splits
    batch = tl.program_id(1) // group_splits // heads_kv
    kv_head = tl.program_id(1) // group_splits % heads_kv
    heads_per_split = group // group_splits
    first_head = kv_head * group + split * heads_per_split
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < seq_k
    kv_offset = batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    k = tl.load(K + kv_offset + offs_n[:, None] * stride_ks + offs_d[None, :], mask=col_ok,
                other=0.0)  # fmt: skip
    v = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh
                + offs_n[:, None] * stride_vs + offs_d[None, :], mask=col_ok,
                other=0.0)  # fmt: skip
    DOC_START += batch.to(tl.int64) * seq_q
    DOC_END += batch.to(tl.int64) * seq_q
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, hi = _query_range(n_start, seq_q, seq_k, DOC_START, DOC_END, IS_CAUSAL, HAS_DOCS,
                          BLOCK_M, BLOCK_N)  # fmt: skip
    for head in range(first_head, first_head + heads_per_split):
        q_ptr = Q + batch.to(tl.int64) * stride_qb + head * stride_qh
        do_ptr = DO + batch.to(tl.int64) * stride_dob + head * stride_doh
        row_stats = (batch.to(tl.int64) * heads_q + head) * seq_q
        for m_start in range(lo, hi, BLOCK_M):
            rows = m_start + offs_m
            row_ok = rows < seq_q
            q = tl.load(q_ptr + rows[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None],
                        other=0.0)  # fmt: skip
            do = tl.load(do_ptr + rows[:, None] * stride_dos + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0)  # fmt: skip
            lse = tl.load(LSE + row_stats + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_stats + rows, mask=row_ok, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            p_t = tl.math.exp2(qk_t - lse[None, :])
            if _needs_mask(m_start, n_start, seq_q, seq_k, IS_CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N):
                doc_start, doc_end = _row_documents(DOC_START, DOC_END, rows, row_ok, HAS_DOCS)
                allowed = _mask(rows[None, :], offs_n[:, None], seq_q, seq_k, doc_start[None, :],
                                doc_end[None, :], IS_CAUSAL, HAS_DOCS)  # fmt: skip
                p_t = tl.where(allowed, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk *= sm_scale
    DK += split.to(tl.int64) * stride_dk_split + batch.to(tl.int64) * stride_dkb
    DV += split.to(tl.int64) * stride_dv_split + batch.to(tl.int64) * stride_dvb
    tl.store(DK + kv_head * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok)  # fmt: skip
    tl.store(DV + kv_head * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok)  # fmt: skip


@autotune(**tuning("dq"))
@jit
def _attention_backward_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    heads_q, seq_q, seq_k, group, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Sq, BLOCK_M), B * Hq): dQ of one query block, dQ += dS K over key blocks."""
    m_start = tl.program_id(0) * BLOCK_M
    batch = tl.program_id(1) // heads_q
    head = tl.program_id(1) % heads_q
    kv_head = head // group
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + head * stride_qh
                + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)  # fmt: skip
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + head * stride_doh
                 + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)  # fmt: skip
    row_stats = (batch.to(tl.int64) * heads_q + head) * seq_q
    lse = tl.load(LSE + row_stats + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_stats + offs_m, mask=row_ok, other=0.0)
    DOC_START += batch.to(tl.int64) * seq_q
    DOC_END += batch.to(tl.int64) * seq_q
    doc_start, doc_end = _row_documents(DOC_START, DOC_END, offs_m, row_ok, HAS_DOCS)
    K += batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    V += batch.to(tl.int64) * stride_vb + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, hi = _key_range(m_start, seq_q, seq_k, DOC_START, DOC_END, IS_CAUSAL, HAS_DOCS,
                        BLOCK_M, BLOCK_N)  # fmt: skip
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + offs_n
        k = tl.load(K + cols[:, None] * stride_ks + offs_d[None, :], mask=cols[:, None] < seq_k,
                    other=0.0)  # fmt: skip
        v_t = tl.load(V + cols[None, :] * stride_vs + offs_d[:, None], mask=cols[None, :] < seq_k,
                      other=0.0)  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if _needs_mask(m_start, n_start, seq_q, seq_k, IS_CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N):
            allowed = _mask(offs_m[:, None], cols[None, :], seq_q, seq_k, doc_start[:, None],
                            doc_end[:, None], IS_CAUSAL, HAS_DOCS)  # fmt: skip
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq *= sm_scale
    tl.store(DQ + batch.to(tl.int64) * stride_dqb + head * stride_dqh
             + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip


# --------------------------------------------------------------------------- launchers


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and sequence strides of a [B, H, S, D] tensor whose last dim is unit-stride."""
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels load rows of D contiguous elements; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_constants(q: torch.Tensor, is_causal: bool, docs) -> dict:
    """Keyword arguments shared by the three autotuned kernels."""
    return dict(
        HEAD_DIM=q.shape[-1],
        IS_CAUSAL=is_causal,
        HAS_DOCS=docs is not None,
        # float32 stays float32 (no TF32), matching PyTorch's default matmul precision.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] document ids -> per-position [start, end) of its run of equal ids, int32 [B, S].

    Computed on the device without a host sync: a run starts where the id changes.
    """
    batch, seq = document_ids.shape
    position = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    new_run = torch.ones_like(document_ids, dtype=torch.bool)
    new_run[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start = torch.where(new_run, position, 0).cummax(dim=1).values
    run_ends = torch.ones_like(new_run)
    run_ends[:, :-1] = new_run[:, 1:]
    end = torch.where(run_ends, position + 1, seq).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The varlen interface: cumulative lengths -> `document_ids` for `flash_attn_func`.

    Args:
        cu_seqlens: [documents + 1] integers 0, l0, l0 + l1, ... (as in flash-attn's varlen API).
        seq_len: the packed length; positions past ``cu_seqlens[-1]`` (padding) form one more
            document of their own.

    Returns:
        [1, seq_len] int32: pack the documents as a batch of one sequence.
    """
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    return ids.to(torch.int32)[None]


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    scale: float,
    docs: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D]; docs: `document_bounds` output or None.

    Returns:
        o [B, Hq, Sq, D] in q's dtype and lse [B, Hq, Sq] float32 (base-2 log-sum-exp of the
        scaled scores, i.e. in units of log2).
    """
    check_device(_attention_forward_kernel, q, k, v)
    batch, heads_q, seq_q, _ = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seq_q, dtype=torch.float32, device=q.device)
    doc_start, doc_end = docs if docs is not None else (lse, lse)  # never read without docs
    grid = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads_q)
    _attention_forward_kernel[grid](
        q, k, v, o, lse, doc_start, doc_end,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        heads_q, seq_q, seq_k, heads_q // heads_kv, scale * _LOG2_E,
        triton.next_power_of_2(max(seq_q, seq_k)),
        **_launch_constants(q, is_causal, docs),
    )  # fmt: skip
    return o, lse


def _group_splits(programs: int, group: int, like: torch.Tensor) -> int:
    """How many programs share one K/V head's query heads in the dK/dV kernel.

    With tensor parallelism a rank may hold a single K/V head: batch * Hkv * Sk / BLOCK_N
    programs can then leave most SMs idle while each loops over all of its group. Splitting the
    group multiplies the programs at the cost of float32 partial sums reduced once (no atomics).
    """
    if like.device.type != "cuda":
        return 1  # the interpreter runs programs one by one: more of them only costs time
    wanted = -(-torch.cuda.get_device_properties(like.device).multi_processor_count // programs)
    return max(d for d in range(1, group + 1) if group % d == 0 and d <= wanted)


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
    docs: tuple[torch.Tensor, torch.Tensor] | None,
    group_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels.

    Args:
        do, o, q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D]; lse: [B, Hq, Sq] from the forward.
        group_splits: how many programs share a K/V head's query heads (a divisor of
            Hq // Hkv); None picks enough to fill the GPU (`_group_splits`).

    Returns:
        dq [B, Hq, Sq, D], dk and dv [B, Hkv, Sk, D], in the inputs' dtype.
    """
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    delta = torch.empty_like(lse)
    preprocess_rows = 64
    _attention_backward_preprocess_kernel[(triton.cdiv(seq_q, preprocess_rows), batch * heads_q)](
        o, do, delta, *_strides(o), *_strides(do), heads_q, seq_q,
        HEAD_DIM=head_dim, BLOCK_M=preprocess_rows, num_warps=1 if interpreting() else 4,
    )  # fmt: skip
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    splits = group_splits or _group_splits(batch * heads_kv * triton.cdiv(seq_k, 64), group, q)
    # One split writes dK/dV directly; several write float32 partials, summed once below.
    partial_dtype = k.dtype if splits == 1 else torch.float32
    dk = torch.empty(splits, *k.shape, dtype=partial_dtype, device=k.device)
    dv = torch.empty(splits, *v.shape, dtype=partial_dtype, device=v.device)
    doc_start, doc_end = docs if docs is not None else (lse, lse)
    constants = _launch_constants(q, is_causal, docs)
    seq_bucket = triton.next_power_of_2(max(seq_q, seq_k))
    grid_kv = lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N"]), batch * heads_kv * splits)
    _attention_backward_dkdv_kernel[grid_kv](
        q, k, v, do, dk, dv, lse, delta, doc_start, doc_end,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        dk.stride(0), *_strides(dk[0]), dv.stride(0), *_strides(dv[0]),
        heads_q, heads_kv, seq_q, seq_k, group, splits, scale * _LOG2_E, scale, seq_bucket,
        **constants,
    )  # fmt: skip
    dk = dk[0] if splits == 1 else dk.sum(0).to(k.dtype)
    dv = dv[0] if splits == 1 else dv.sum(0).to(v.dtype)
    grid_q = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads_q)
    _attention_backward_dq_kernel[grid_q](
        q, k, v, do, dq, lse, delta, doc_start, doc_end,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        heads_q, seq_q, seq_k, group, scale * _LOG2_E, scale, seq_bucket, **constants,
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------- autograd


class FlashAttentionFunction(torch.autograd.Function):
    """softmax(scale * q k^T + mask) v with the Triton kernels; see `flash_attn_func`."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale, document_ids):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        docs = document_bounds(document_ids) if document_ids is not None else None
        o, lse = attention_forward(q, k, v, is_causal, scale, docs)
        ctx.save_for_backward(q, k, v, o, lse, *(docs or ()))
        ctx.is_causal, ctx.scale = is_causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *docs = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            _unit_last_stride(do), q, k, v, o, lse, ctx.is_causal, ctx.scale, tuple(docs) or None
        )
        return dq, dk, dv, None, None, None


def _validate(q, k, v, document_ids) -> None:
    """ValueErrors naming the offending value and what is supported."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"q, k, v must share one dtype among float16, bfloat16, float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch mismatch: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[3]}, k/v have {k.shape[3]}")
    head_dim = q.shape[3]
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two from 16 to 256, got {head_dim}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: Sq={q.shape[2]}, Sk={k.shape[2]}")
    if document_ids is None:
        return
    if q.shape[2] != k.shape[2] or tuple(document_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"document_ids must be [batch, seq] = [{q.shape[0]}, {q.shape[2]}] with Sq == Sk "
            f"(self-attention over packed documents); got {tuple(document_ids.shape)}, "
            f"Sq={q.shape[2]}, Sk={k.shape[2]}"
        )
    if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be an integer tensor, got {document_ids.dtype}")


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable attention with ``scaled_dot_product_attention``'s layout and contract.

    Args:
        q: [batch, Hq, Sq, head_dim]; k, v: [batch, Hkv, Sk, head_dim] with Hq % Hkv == 0
            (grouped-query: query head h reads K/V head h // (Hq // Hkv), as SDPA's
            ``enable_gqa``). float16, bfloat16 or float32; head_dim a power of two 16..256.
        is_causal: row i sees keys 0..i (top-left aligned, as SDPA, also when Sq != Sk).
        scale: multiplies q k^T; default 1 / sqrt(head_dim).
        document_ids: [batch, seq] integers, packed sequences: a token attends only within its
            run of equal ids (combined with `is_causal`). Needs Sq == Sk.

    Returns:
        [batch, Hq, Sq, head_dim] in q's dtype.
    """
    _validate(q, k, v, document_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttentionFunction.apply(q, k, v, bool(is_causal), scale, document_ids)
