"""KV-cache decoding (`engine.inference.generation`) on real gloo ranks.

Random HF `LlamaForCausalLM` weights (local config, no download) are loaded into our model:
greedy decoding at TP=2 must equal transformers' `generate` token for token; cached decoding
must give the logits of recomputing the whole sequence (1e-5, float32) at TP=2, PP=2 and
TP=2 x PP=2; padded batches, seeded sampling and EOS (one id or a set) are checked against
single-prompt runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from engine import parallel_state
from engine.inference.generation import (
    SamplingParams,
    forward_logits,
    generate,
    left_pad,
    sample,
)
from engine.models import LlamaModel, ModelConfig
from engine.models.kv_cache import KVCache
from engine.models.llama.hf import canonical_from_hf, hf_config_kwargs
from engine.models.weights import load_full_state
from tests.paths import REPO
from tests.rank_pool import module_pool

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

pool = module_pool(4)
TOKENIZER = REPO.parent / "shared" / "data" / "llama2-tokenizer.model"

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
    load_full_state(model, canonical_from_hf(hf.state_dict(), config))
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
            cached = forward_logits(model, tokens[:, begin:end], positions[:, begin:end], cache)
            cache.advance()
            # Recompute each prompt alone (no padding) from scratch with the training path.
            for row, prompt in enumerate(PROMPTS):
                start = max(len(p) for p in PROMPTS) - len(prompt)
                ids = tokens[row : row + 1, start:end]
                full = forward_logits(model, ids, torch.arange(ids.size(1)).unsqueeze(0))
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


def decoding_checks(config: ModelConfig, tp: int, pp: int) -> dict[str, object]:
    """Batched vs alone, seeded sampling, top-k=1, EOS and streaming, at TP x PP."""
    hf = _hf_model(config)
    model = _our_model(config, hf, tp, pp)
    try:
        out: dict[str, object] = {}
        streamed: list[list[int]] = []
        batch = generate(model, PROMPTS, 8, on_tokens=lambda t, f: streamed.append(t.tolist()))
        out["batch"] = batch
        out["alone"] = [generate(model, [p], 8)[0] for p in PROMPTS]
        out["streamed"] = [list(column) for column in zip(*streamed, strict=True)]
        sampling = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)
        out["sampled"] = generate(model, PROMPTS, 8, sampling)
        out["sampled_again"] = generate(model, PROMPTS, 8, sampling)
        out["sampled_other_seed"] = generate(model, PROMPTS, 8, SamplingParams(1.0, seed=8))
        out["top_k_1"] = generate(model, PROMPTS, 8, SamplingParams(temperature=1.0, top_k=1))
        # EOS: the third greedy token of the first prompt; that sequence stops there, the
        # others go on (unless they emit it too).
        eos = batch[0][2]
        out["eos"] = eos
        out["with_eos"] = generate(model, PROMPTS, 8, eos_id=eos)
        # A set of stop ids (a chat model's EOS and end of turn): each row stops at the first
        # of them it emits.
        out["stops"] = {eos, batch[1][1]}
        out["with_stops"] = generate(model, PROMPTS, 8, eos_id=out["stops"])
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("tp, pp", [(2, 2), (2, 1)])
def test_batching_sampling_and_eos(pool, tp, pp):
    results = pool.run(decoding_checks, ModelConfig.from_preset("tiny-gqa"), tp, pp)
    first = results[0]
    for other in results[1:]:
        assert other == first  # every rank holds the same tokens, sampled ones included
    assert first["batch"] == first["alone"]  # left padding changes nothing
    assert first["streamed"] == first["batch"]
    assert first["sampled"] == first["sampled_again"]
    assert first["sampled"] != first["sampled_other_seed"]
    assert first["top_k_1"] == first["batch"]
    eos = first["eos"]
    for greedy, stopped in zip(first["batch"], first["with_eos"], strict=True):
        expected = greedy[: greedy.index(eos) + 1] if eos in greedy else greedy
        assert stopped == expected
    assert len(first["with_eos"][0]) == 3
    for greedy, stopped in zip(first["batch"], first["with_stops"], strict=True):
        ends = [at for at, token in enumerate(greedy) if token in first["stops"]]
        assert stopped == (greedy[: ends[0] + 1] if ends else greedy)
    assert len(first["with_stops"][1]) <= 2  # the second id stops row 1 by its 2nd token


def padded_batch_vs_hf(config: ModelConfig, max_new_tokens: int) -> tuple[list, list]:
    """Our greedy continuation of the padded batch at TP=2 and HF's (left padding, mask)."""
    hf = _hf_model(config)
    model = _our_model(config, hf, 2, 1)
    try:
        ours = generate(model, PROMPTS, max_new_tokens)
        tokens, valid, _ = left_pad(PROMPTS, max(len(p) for p in PROMPTS), 0, torch.device("cpu"))
        out = hf.generate(
            tokens, attention_mask=valid.long(), do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        return ours, out[:, tokens.size(1) :].tolist()
    finally:
        parallel_state.destroy_model_parallel()


def test_padded_batch_matches_transformers(pool):
    ours, theirs = pool.run(padded_batch_vs_hf, ModelConfig.from_preset("tiny-gqa"), 10)[0]
    assert ours == theirs


@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"needs {TOKENIZER}")
def test_tool_streams_transformers_greedy_text_at_tp2(tmp_path):
    """tools/generate.py under torchrun (TP=2) on a checkpoint converted from HF prints the
    text of transformers' greedy continuation."""
    from engine.conversion.convert import hf_to_engine
    from engine.data.tokenizer import build_tokenizer

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )).eval()  # fmt: skip
    hf.save_pretrained(tmp_path / "hf")
    shutil.copyfile(TOKENIZER, tmp_path / "hf" / "tokenizer.model")
    hf_to_engine(tmp_path / "hf", tmp_path / "engine", tp_size=2)
    prompt = "To be, or not to be"
    tokenizer = build_tokenizer("Llama2Tokenizer", TOKENIZER)
    ids = [tokenizer.bos] + tokenizer.tokenize(prompt)
    out = hf.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
        eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )[0].tolist()  # fmt: skip
    expected = tokenizer.detokenize(out)[len(tokenizer.detokenize(ids)) :]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "tools/generate.py", "--load", str(tmp_path / "engine"), "--prompt", prompt,
         "--max-new-tokens", "10", "--ignore-eos", "--tensor-model-parallel-size", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert prompt + expected in result.stdout, (result.stdout, expected)


def test_sampling_filters():
    """top-k and top-p keep exactly the expected tokens (one process, many draws)."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(2000, -1)
    generator = torch.Generator().manual_seed(0)

    def drawn(**kwargs) -> set[int]:
        return set(sample(logits, SamplingParams(1.0, **kwargs), generator).tolist())

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.75) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert drawn(top_p=0.85) == {0, 1, 2}
    assert drawn(top_p=0.1) == {0}  # the most likely token always stays
    assert sample(logits[:1], SamplingParams()).tolist() == [0]  # greedy
    with pytest.raises(ValueError, match="--top-p"):
        SamplingParams(top_p=0.0)
