"""Perplexity (`engine.inference.perplexity`, tools/evaluate.py) against transformers, at
several layouts.

A random `transformers` LLaMA with the LLaMA-2 vocabulary is converted to an engine
checkpoint; its perplexity on Shakespeare (JSONL, tokenized with the LLaMA-2 SentencePiece
model; and the same tokens as an indexed dataset) with a sliding window must equal the one
computed from transformers' logits with HuggingFace's windowing recipe, within 1e-4 relative,
and agree across TP=1 x DP=2, TP=2 and PP=2.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import parallel_state
from engine.data.indexed_dataset import IndexedDatasetBuilder, bin_path, idx_path
from engine.data.tokenizer import build_tokenizer
from engine.inference.loading import load_model
from engine.inference.perplexity import evaluate_perplexity, read_documents, sliding_windows
from tests.inference.checkpoints import TOKENIZER, converted_checkpoint
from tests.paths import REPO
from tests.rank_pool import module_pool

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

DATA = REPO.parent / "shared" / "data"
TEXT = DATA / "tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(
    not (TOKENIZER.exists() and TEXT.exists()), reason=f"needs {TOKENIZER} and {TEXT}"
)

SEQ_LENGTH, STRIDE = 96, 40
pool = module_pool(2)


def hf_perplexity(model, documents: list[list[int]], seq_length: int, stride: int) -> float:
    """HuggingFace's perplexity recipe: windows of ``seq_length`` every ``stride`` tokens,
    labels before the previous window's end masked with -100."""
    nll, count = 0.0, 0
    for document in documents:
        ids = torch.tensor(document)
        previous_end = 0
        for begin in range(0, len(ids), stride):
            end = min(begin + seq_length, len(ids))
            target_length = end - previous_end
            input_ids = ids[begin:end].unsqueeze(0)
            labels = input_ids.clone()
            labels[:, :-target_length] = -100
            with torch.no_grad():
                logits = model(input_ids).logits[0, :-1].double()
            targets = labels[0, 1:]
            keep = targets != -100
            log_probs = torch.log_softmax(logits[keep], dim=-1)
            nll -= log_probs.gather(1, targets[keep].unsqueeze(1)).sum().item()
            count += int(keep.sum())
            previous_end = end
            if end == len(ids):
                break
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, jsonl path, indexed prefix, documents, HF reference perplexity)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    # Sharper predictions than the near-uniform initialisation.
    checkpoint, hf = converted_checkpoint(tmp, tp_size=2, lm_head_scale=6)
    paragraphs = TEXT.read_text()[:8000].split("\n\n")
    texts = ["\n\n".join(paragraphs[i : i + 12]) for i in range(0, 48, 12)]
    jsonl = tmp / "text.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = build_tokenizer("Llama2Tokenizer", TOKENIZER)
    documents = read_documents(jsonl, tokenizer)
    prefix = tmp / "text_document"
    builder = IndexedDatasetBuilder(bin_path(prefix))
    for document in documents:
        builder.add_document(document)
    builder.finalize(idx_path(prefix))
    reference = hf_perplexity(hf, documents, SEQ_LENGTH, STRIDE)
    return str(checkpoint), str(jsonl), str(prefix), documents, reference


def perplexity_at(
    checkpoint: str, data: str, tp: int, pp: int, micro_batch_size: int = 1
) -> tuple[float, int, int]:
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        tokenizer = build_tokenizer("Llama2Tokenizer", TOKENIZER)
        model = load_model(checkpoint)
        documents = read_documents(data, tokenizer)
        result = evaluate_perplexity(model, documents, SEQ_LENGTH, STRIDE, micro_batch_size)
        return result.perplexity, result.tokens, result.windows
    finally:
        parallel_state.destroy_model_parallel()


def test_windows_score_each_token_once():
    for n, seq, stride in ((10, 4, 2), (97, 96, 40), (500, 96, 96), (5, 8, 3), (1, 4, 4)):
        scored = [
            w.begin + i
            for w in sliding_windows(n, seq, stride)
            for i in range(w.score_from, w.end - w.begin)
        ]
        assert scored == list(range(1, n)), (n, seq, stride)
        assert all(w.end - w.begin <= seq for w in sliding_windows(n, seq, stride))
    with pytest.raises(ValueError, match="--stride"):
        sliding_windows(10, 4, 5)


def test_perplexity_equals_transformers_at_every_layout(pool, setup):
    checkpoint, jsonl, prefix, documents, reference = setup
    expected_tokens = sum(len(d) - 1 for d in documents)
    assert expected_tokens > 4 * SEQ_LENGTH  # long documents: several windows each
    results = {}
    runs = ((1, 1, jsonl, 1), (2, 1, jsonl, 1), (1, 2, prefix, 1), (2, 1, prefix, 1),
            (1, 2, jsonl, 3))  # fmt: skip
    for tp, pp, data, micro_batch_size in runs:
        values = pool.run(perplexity_at, checkpoint, data, tp, pp, micro_batch_size)
        assert len({v[0] for v in values}) == 1  # every rank reports the same total
        perplexity, tokens, _ = values[0]
        assert tokens == expected_tokens
        assert abs(perplexity - reference) <= 1e-4 * reference, (tp, pp, perplexity, reference)
        results[(tp, pp, Path(data).name, micro_batch_size)] = perplexity
    print(f"HF {reference:.6f}; engine (tp, pp, data, micro-batch): {results}")
    # TP changes only the order of float32 sums: the layouts agree far below the tolerance.
    spread = max(results.values()) - min(results.values())
    assert spread <= 1e-6 * reference, results


def test_tool_prints_the_perplexity(setup):
    """JSONL without tokenizer flags: the converted checkpoint names the HF directory's. The
    windows' progress goes to stderr (a log line per interval, the final one at 100%)."""
    checkpoint, jsonl, _, _, reference = setup
    result = subprocess.run(
        [sys.executable, "tools/evaluate.py", "--load", checkpoint, "--data-path", jsonl,
         "--seq-length", str(SEQ_LENGTH), "--stride", str(STRIDE)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
        env={**os.environ, "ENGINE_PROGRESS_INTERVAL_S": "0.001"},
    )  # fmt: skip
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("perplexity ")
    assert abs(float(line.split()[1]) - reference) <= 1e-4 * reference
    windows = line.split()[-1]
    progress = [p for p in result.stderr.splitlines() if p.startswith("perplexity: [")]
    assert len(progress) > 1, result.stderr  # lines along the way, not only at the end
    assert f"100.0% {windows}/{windows} windows | " in progress[-1] and "ETA" in progress[0]
