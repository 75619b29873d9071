"""tools/preprocess_data.py throughput against the tokenizer's own ceiling, same corpus, same cores.

    python benchmarks/preprocess.py [--repeat 8] [--workers N] [--tokenizer-model PATH]

The corpus is tinyshakespeare (../shared/data) cut into ~2 KB documents and repeated
`--repeat` times as a JSONL file. The ceiling is the tokenizer's batched multi-threaded encode
of the same documents already in memory (no JSON, no file, no output), the faster of one call
for all documents and calls of the tool's batch size; ours is the whole tool, file to
`.bin/.idx`. Best of `--trials` rounds, alternating the two. The last line is
`ratio_to_tokenizer_ceiling=X.XX`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.data.indexed_dataset import IndexedDataset  # noqa: E402
from engine.data.tokenizer import build_tokenizer  # noqa: E402
from tools import preprocess_data  # noqa: E402

SHARED = REPO / ".." / "shared" / "data"


def documents(text: str, target_chars: int = 2048) -> list[str]:
    """Paragraphs grouped into documents of about `target_chars`."""
    docs, current = [], []
    size = 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= target_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def best_interleaved(trials: int, *fns) -> list[float]:
    """Best time of each function over `trials` rounds, alternating them so that load from
    other processes on a shared machine hits both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(trials):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=8, help="copies of the corpus")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokenizer-model", default=str(SHARED / "llama2-tokenizer.model"))
    parser.add_argument("--corpus", default=str(SHARED / "tinyshakespeare.txt"))
    args = parser.parse_args()
    for path, flag in ((args.tokenizer_model, "--tokenizer-model"), (args.corpus, "--corpus")):
        if not os.path.isfile(path):
            raise SystemExit(f"{flag} {path}: not found (the shared test data is beside the repo)")

    docs = documents(Path(args.corpus).read_text(encoding="utf-8")) * args.repeat
    tokenizer = build_tokenizer("Llama2Tokenizer", args.tokenizer_model)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "corpus.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        megabytes = os.path.getsize(jsonl) / 2**20

        num_tokens = sum(len(ids) for ids in tokenizer.tokenize_batch(docs, args.workers))

        flags = [
            "--input",
            jsonl,
            "--output-prefix",
            os.path.join(tmp, "out"),
            "--append-eod",
            "--tokenizer-type",
            "Llama2Tokenizer",
            "--tokenizer-model",
            args.tokenizer_model,
            "--workers",
            str(args.workers),
            "--log-interval",
            str(10**9),
        ]
        tool_args = preprocess_data.get_args(flags)
        batch = preprocess_data._BATCH_LINES
        whole_s, chunked_s, ours_s = best_interleaved(
            args.trials,
            lambda: tokenizer.tokenize_batch(docs, args.workers),
            # The tool's batch size too, so the ceiling is the better of the two.
            lambda: [
                tokenizer.tokenize_batch(docs[i : i + batch], args.workers)
                for i in range(0, len(docs), batch)
            ],
            lambda: preprocess_data.preprocess(tool_args),
        )
        ceiling_s = min(whole_s, chunked_s)
        written = IndexedDataset(os.path.join(tmp, "out_text_document")).num_tokens
        assert written == num_tokens + len(docs), "the tool wrote other tokens than the ceiling"

    print(
        f"corpus: {len(docs):,} documents, {megabytes:.1f} MB, {num_tokens:,} tokens; "
        f"{args.workers} workers on {os.cpu_count()} cores"
    )
    print(f"tokenizer ceiling (in-memory batched encode): {num_tokens / ceiling_s:,.0f} tokens/s")
    print(
        f"tools/preprocess_data.py (file to .bin/.idx): {num_tokens / ours_s:,.0f} tokens/s "
        f"({megabytes / ours_s:.1f} MB/s)"
    )
    print(f"ratio_to_tokenizer_ceiling={ceiling_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
