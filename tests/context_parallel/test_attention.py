"""Ring (p2p) and all-to-all (a2a) attention against PyTorch's causal SDPA on the whole
sequence, on real gloo ranks: each CP rank's output and its chunks' dQ, dK, dV equal the
reference's within float32 tolerance, with grouped-query attention; the ring's schedule
gives every rank the same attention work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import parallel_state
from engine.context_parallel import (
    BLOCK_BACKENDS,
    all_to_all_attention,
    gather_order,
    local_positions,
    merge_block,
    ring_attention,
    ring_steps,
    split_sequence,
)
from engine.models.backends import torch_attention
from tests.rank_pool import module_pool

pool = module_pool(4)


def _inputs(heads: int, kv_heads: int, seq: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(5)
    b, d = 2, 16
    q = torch.randn(b, heads, seq, d, generator=generator, dtype=dtype)
    k = torch.randn(b, kv_heads, seq, d, generator=generator, dtype=dtype)
    v = torch.randn(b, kv_heads, seq, d, generator=generator, dtype=dtype)
    dout = torch.randn(b, heads, seq, d, generator=generator, dtype=dtype)
    return q, k, v, dout


def attention_on_ranks(cp: int, comm: str, heads: int, kv_heads: int, seq: int) -> dict:
    """Every rank: the reference on the whole sequence, then its CP share (CP ranks are the
    first ``cp`` ranks' groups: TP=1, DP = world / cp)."""
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    try:
        q, k, v, dout = _inputs(heads, kv_heads, seq)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        reference = torch_attention(*full, is_causal=True)
        reference.backward(dout)
        local = [split_sequence(t, 2).detach().requires_grad_() for t in (q, k, v)]
        group = parallel_state.get_context_parallel_group()
        if comm == "p2p":
            out = ring_attention(*local, BLOCK_BACKENDS["torch"], group)
        else:
            out = all_to_all_attention(*local, torch_attention, group)
        out.backward(split_sequence(dout, 2))
        expected = [split_sequence(t, 2) for t in (reference, *(t.grad for t in full))]
        got = [out, *(t.grad for t in local)]
        return {"errors": [(g - e).abs().max().item() for g, e in zip(got, expected, strict=True)]}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("comm", ["p2p", "a2a"])
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_attention_equals_the_whole_sequence(pool, cp, comm):
    for rank, result in enumerate(pool.run(attention_on_ranks, cp, comm, 8, 4, 32)):
        assert max(result["errors"]) < 1e-5, (rank, result["errors"])


def test_ring_with_one_kv_head(pool):
    """MQA (one K/V head for 4 query heads) through the ring."""
    for rank, result in enumerate(pool.run(attention_on_ranks, 4, "p2p", 4, 1, 16)):
        assert max(result["errors"]) < 1e-5, (rank, result["errors"])


def test_blocks_merge_to_full_attention():
    """Two key blocks merged with their log-sum-exp equal attention over both."""
    q, k, v, _ = _inputs(4, 2, 16)
    block = BLOCK_BACKENDS["torch"]
    out, lse = None, None
    for keys in (slice(0, 5), slice(5, 16)):
        part = block.forward(q, k[:, :, keys], v[:, :, keys], False, 0.25)
        out, lse = merge_block(out, lse, *part)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_split_positions_and_gather_order():
    assert local_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert gather_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    expected = r"length 10 must be divisible by 2 x --context-parallel-size \(4\) = 8"
    with pytest.raises(ValueError, match=expected):
        local_positions(10, 0, 4)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_ring_work_is_balanced(cp):
    """Attention pairs each rank computes, counted from the schedule the ring runs: equal
    on every rank, and together the causal triangle of the whole sequence."""
    chunk = 16
    work = [sum(step.pairs(chunk) for step in ring_steps(r, cp)) for r in range(cp)]
    assert max(work) == min(work)
    seq = 2 * cp * chunk
    assert sum(work) == seq * (seq + 1) // 2  # each pair with key <= query, once
    sources = [[step.source for step in ring_steps(r, cp)] for r in range(cp)]
    assert all(sorted(s) == list(range(cp)) for s in sources)
