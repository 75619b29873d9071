"""The model with the Triton backends equals the model with the PyTorch backends.

Tiny LLaMA (GQA), float32, TP=2 on real gloo ranks, Triton under its interpreter on the CPU:
logits, per-token losses and every parameter's gradient agree, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backends need triton")

from engine.models import ModelConfig  # noqa: E402
from tests.models.test_tensor_parallel_model import run_layouts  # noqa: E402
from tests.rank_pool import module_pool  # noqa: E402

pool = module_pool(2)


def test_triton_backends_match_torch_backends(pool):
    # head_dim 16: the smallest the kernel takes.
    common = dict(num_layers=1, hidden_size=128, max_position_embeddings=64, sequence_parallel=True)
    torch_config = ModelConfig.from_preset(
        "tiny-gqa", attention_backend="torch", norm_backend="torch", **common
    )
    triton_config = ModelConfig.from_preset(
        "tiny-gqa", attention_backend="triton", norm_backend="triton", **common
    )
    (reference,) = pool.run(run_layouts, torch_config, [2])[0]
    (triton,) = pool.run(run_layouts, triton_config, [2])[0]
    torch.testing.assert_close(triton["logits"], reference["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(triton["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(
            triton["grads"][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
            msg=f"grad {name}",
        )  # fmt: skip
