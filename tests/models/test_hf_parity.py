"""Our LlamaModel against HuggingFace transformers' LlamaForCausalLM with the same weights.

The HF model is built from a local config with random weights (no download); its weights are
loaded into ours through the canonical view, at TP=1 and TP=2, and the logits must agree
within 1e-4 (max abs, float32).
"""

from __future__ import annotations

import pytest
import torch

from engine import parallel_state
from engine.models import LlamaModel, ModelConfig
from engine.models.llama.hf import canonical_from_hf, hf_config_kwargs
from engine.models.weights import load_full_state
from engine.tensor_parallel import gather_from_tensor_model_parallel_region
from tests.rank_pool import module_pool

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")


pool = module_pool(2)


def compare_with_hf(config: ModelConfig, tp: int) -> float:
    """Max |our logits - HF logits| for random HF weights copied into our model at TP=tp."""
    torch.manual_seed(0)  # the same HF weights on every rank
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_kwargs(config)))
    hf.eval()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=generator)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        model = LlamaModel(config)
        load_full_state(model, canonical_from_hf(hf.state_dict(), config))
        with torch.no_grad():
            ours = gather_from_tensor_model_parallel_region(model(tokens))[..., : config.vocab_size]
            theirs = hf(tokens).logits
        return (ours - theirs).abs().max().item()
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", {"rotary_base": 10000.0}),
        ("tiny", {"rotary_base": 500000.0}),
        ("tiny-gqa", {"rotary_base": 10000.0}),
        ("tiny-gqa", {"rotary_base": 500000.0}),
        ("tiny-gqa", {"tie_word_embeddings": True}),
    ],
)
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(pool, preset, overrides, tp):
    config = ModelConfig.from_preset(preset, **overrides)
    max_abs = pool.run(compare_with_hf, config, tp)
    assert max(max_abs) <= 1e-4, f"max |logits - HF logits| = {max(max_abs):.2e}"
