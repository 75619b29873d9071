"""The quickstart's corpus and tokenizer, from text that ships with Python: nothing downloaded.

The standard library's ``pydoc_data.topics`` holds the language reference's topics (what
``help("for")`` prints), about 460 kB of English prose and code. This script writes it as
JSONL, one document per group of paragraphs (so the train/valid/test split has documents to
split), and trains a SentencePiece tokenizer on it (LLaMA-style: BPE, byte fallback, BOS 1,
EOS 2). Then `tools/preprocess_data.py` tokenizes the JSONL as it would any corpus::

    python examples/quickstart_data.py --output-dir /tmp/quickstart --vocab-size 2000
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import sys

PARAGRAPHS_PER_DOCUMENT = 8


def documents() -> list[str]:
    """The topics, cut into documents of a few paragraphs each, in a fixed order."""
    docs = []
    for name in sorted(pydoc_data.topics.topics):
        paragraphs = [p.strip() for p in pydoc_data.topics.topics[name].split("\n\n")]
        paragraphs = [p for p in paragraphs if p]
        for start in range(0, len(paragraphs), PARAGRAPHS_PER_DOCUMENT):
            docs.append("\n\n".join(paragraphs[start : start + PARAGRAPHS_PER_DOCUMENT]))
    return docs


def train_tokenizer(text_path: str, model_prefix: str, vocab_size: int) -> str:
    """A SentencePiece BPE model on ``text_path``; returns the ``.model`` path."""
    try:
        import sentencepiece as spm
    except ImportError:
        sys.exit("the quickstart needs sentencepiece: pip install sentencepiece")
    spm.SentencePieceTrainer.train(
        input=text_path, model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=os.cpu_count() or 1, minloglevel=2,
    )  # fmt: skip
    return model_prefix + ".model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    docs = documents()
    jsonl = os.path.join(args.output_dir, "pydoc_topics.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    text = os.path.join(args.output_dir, "pydoc_topics.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n".join(docs))
    model = train_tokenizer(text, os.path.join(args.output_dir, "tokenizer"), args.vocab_size)
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters -> {jsonl}")
    print(f"tokenizer: {args.vocab_size} pieces -> {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
