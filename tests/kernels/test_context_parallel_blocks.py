"""The Triton block attention ring attention uses (`engine.context_parallel.blocks`) against
the PyTorch one: output, natural-log log-sum-exp and the block backward under a merged
output, causal and not, with grouped-query attention (Triton's interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

from engine.context_parallel import BLOCK_BACKENDS, merge_block


@pytest.mark.parametrize("causal", [True, False])
def test_triton_blocks_equal_torch_blocks(device, causal):
    generator = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(1, 4, 32, 16, generator=generator) for _ in range(2))
    k, v = (torch.randn(1, 2, 32, 16, generator=generator) for _ in range(2))
    q, k, v, dout = (t.to(device) for t in (q, k, v, dout))
    results = {}
    for name, block in BLOCK_BACKENDS.items():
        # Two key blocks merged (the second only where not causal), then each one's backward
        # under the merged statistics.
        out, lse = merge_block(None, None, *block.forward(q, k, v, causal, 0.25))
        out2, lse2 = block.forward(q, k.flip(2), v.flip(2), False, 0.25)
        out, lse = merge_block(out, lse, out2, lse2)
        grads = block.backward(dout, q, k, v, out, lse, causal, 0.25)
        results[name] = (out, lse, *grads)
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-4, atol=1e-4)
