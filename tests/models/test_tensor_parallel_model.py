"""Tensor parallelism against the single-process model, on real gloo ranks.

For each layout the whole LlamaModel runs forward (logits and loss) and backward on the same
tokens; logits, per-token losses and every parameter's gradient (gathered to full tensors under
canonical names) must equal the TP=1 run within 1e-5 relative in float32.
"""

from __future__ import annotations

import pytest
import torch

from engine import parallel_state
from engine.distributed import finalize_model_grads
from engine.models import LlamaModel, ModelConfig
from engine.models.weights import gather_full_state
from engine.tensor_parallel import gather_from_tensor_model_parallel_region
from tests.rank_pool import module_pool

BATCH, SEQ = 2, 16


pool = module_pool(4)


def _tokens(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def run_layout(config: ModelConfig, tp: int) -> dict[str, object] | None:
    """Forward + backward under TP=tp; rank 0 returns logits, losses and full gradients."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        model = LlamaModel(config)
        inputs, labels = _tokens(config.vocab_size)
        logits = model(inputs)
        logits = gather_from_tensor_model_parallel_region(logits)[..., : config.vocab_size]
        losses = model(inputs, labels=labels)
        losses.mean().backward()
        finalize_model_grads([model])
        grads = gather_full_state(model, grads=True)
        weights = gather_full_state(model)
        if torch.distributed.get_rank() != 0:
            return None
        return {"logits": logits.detach(), "losses": losses.detach(), "grads": grads, "w": weights}
    finally:
        parallel_state.destroy_model_parallel()


def run_layouts(config: ModelConfig, tps: list[int]) -> list[dict[str, object] | None]:
    return [run_layout(config, tp) for tp in tps]


def _assert_same(reference: dict, other: dict, what: str) -> None:
    torch.testing.assert_close(other["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other["losses"], reference["losses"], rtol=1e-5, atol=0)
    assert other["w"].keys() == reference["w"].keys(), what
    for name, weight in reference["w"].items():
        torch.testing.assert_close(other["w"][name], weight, rtol=0, atol=0, msg=f"{what}: {name}")
    for name, grad in reference["grads"].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(
            other["grads"][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=f"{what}: grad {name}"
        )


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", {}),
        ("tiny", {"sequence_parallel": True}),
        ("tiny-gqa", {}),  # TP=2 shards the 2 K/V heads, TP=4 replicates them
        ("tiny-gqa", {"sequence_parallel": True}),
        ("tiny", {"vocab_size": 32003}),  # a vocabulary TP does not divide: padded
        ("tiny", {"tie_word_embeddings": True, "sequence_parallel": True}),
    ],
)
def test_tensor_parallel_matches_single_process(pool, preset, overrides):
    config = ModelConfig.from_preset(preset, **overrides)
    reference, tp2, tp4 = pool.run(run_layouts, config, [1, 2, 4])[0]
    _assert_same(reference, tp2, f"{preset} {overrides} TP=2")
    _assert_same(reference, tp4, f"{preset} {overrides} TP=4")


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recomputation_gives_the_same_gradients(pool, granularity):
    plain = ModelConfig.from_preset("tiny-gqa", sequence_parallel=True)
    recomputed = ModelConfig.from_preset(
        "tiny-gqa", sequence_parallel=True, recompute_granularity=granularity
    )
    (reference,) = pool.run(run_layouts, plain, [2])[0]
    (other,) = pool.run(run_layouts, recomputed, [2])[0]
    _assert_same(reference, other, f"recompute {granularity}")
