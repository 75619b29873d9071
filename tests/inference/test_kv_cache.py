"""KV-cached decoding of a model built with ``recompute_granularity="full"``, on real gloo ranks.

Full recompute checkpoints whole decoder layers for the backward of training; decoding has no
backward, and `LlamaModel.forward` once checkpointed the layers without their ``kv_cache``
(nothing was cached, each step attended over its own tokens only). Greedy decoding of a padded
batch with full recompute must give the tokens and logits of the same weights without
recompute, at TP=1 (DP=2), PP=2 and TP=2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from engine import parallel_state
from engine.inference.generation import forward_logits, generate, left_pad
from engine.models import LlamaModel, ModelConfig
from engine.models.kv_cache import KVCache
from tests.rank_pool import module_pool

pool = module_pool(2)

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 250, 31], [12, 12, 40, 200, 9]]
STEPS = 6


def cached_greedy(model: LlamaModel) -> dict[str, object]:
    """Greedy decoding of the padded ``PROMPTS`` with a KV cache: the logits of every step's
    last position ``[b, V]`` (last stage; None elsewhere) and the tokens (every rank)."""
    prompt_len = max(len(p) for p in PROMPTS)
    total = prompt_len + STEPS
    tokens, valid, positions = left_pad(PROMPTS, total, 0, torch.device("cpu"))
    cache = KVCache(model, len(PROMPTS), total)
    begin, end, steps = 0, prompt_len, []
    for _ in range(STEPS):
        cache.prepare(valid[:, begin:end])
        logits = forward_logits(model, tokens[:, begin:end], positions[:, begin:end], cache)
        cache.advance()
        next_tokens = torch.zeros(len(PROMPTS), dtype=torch.long)
        if logits is not None:
            steps.append(logits[:, -1])
            next_tokens = logits[:, -1].argmax(-1)
        dist.broadcast(next_tokens, src=dist.get_world_size() - 1)  # the last stage's
        tokens[:, end] = next_tokens
        begin, end = end, end + 1
    return {
        "logits": torch.stack(steps) if steps else None,
        "tokens": tokens[:, prompt_len:].tolist(),
        "generated": generate(model, PROMPTS, STEPS),
    }


def recompute_vs_plain(config: ModelConfig, tp: int, pp: int) -> dict[str | None, dict]:
    """`cached_greedy` of the same weights built without recompute and with full recompute."""
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        out = {}
        for granularity in (None, "full"):
            # Every parameter has its own seeded init: the same weights either way.
            model = LlamaModel(dataclasses.replace(config, recompute_granularity=granularity))
            out[granularity] = cached_greedy(model.eval())
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("tp, pp", [(1, 1), (1, 2), (2, 1)])
def test_full_recompute_keeps_the_kv_cache(pool, tp, pp):
    results = pool.run(recompute_vs_plain, ModelConfig.from_preset("tiny-gqa"), tp, pp)
    for rank in results:
        plain, full = rank[None], rank["full"]
        assert full["tokens"] == plain["tokens"]
        assert full["generated"] == plain["generated"] == plain["tokens"]
        assert (full["logits"] is None) == (plain["logits"] is None)
        if plain["logits"] is not None:
            torch.testing.assert_close(full["logits"], plain["logits"], rtol=0, atol=1e-6)
    assert any(rank[None]["logits"] is not None for rank in results)
