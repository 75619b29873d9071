"""JSONL (plain, .gz or .zst) -> `{output_prefix}_{key}_document.bin/.idx`, Megatron-LM style.

Same flags and same bytes as Megatron-LM's `tools/preprocess_data.py`::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod \\
        --workers 2

What Megatron's tool writes, and so this one: one document per input line and, for a string
value, one sequence per document; a list of strings is a document of one sequence per
non-empty string; EOD is appended to the last sequence of non-empty documents only; a
document that tokenizes to nothing is still recorded (a document-index entry with no
sequence); tokens are uint16 below 65,500 vocabulary entries, else int32. With
`--partitions P`, Megatron sends line i to partition i % P and concatenates the partitions in
order; this tool keeps that order so the output stays byte-identical.

How it differs: the input is streamed in bounded batches (memory does not grow with the
corpus), the tokenizer's own threaded batch encoder does the work (`--workers` threads) while
the next batch is parsed, and malformed lines are counted, reported with line numbers and
skipped (or fatal with `--strict`) instead of crashing the run.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype  # noqa: E402
from engine.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer  # noqa: E402

_BATCH_LINES = 1024
_BATCH_BYTES = 2 << 20  # a batch holds at most this much JSON (plus one line)
_REPORTED_MALFORMED = 10


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse Megatron-LM's preprocessing flags (plus `--strict`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSONL file (.gz/.zst ok) or a glob")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize")
    group.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument(
        "--tokenizer-model", help="SentencePiece .model, HF tokenizer.json/dir, TikToken .json"
    )
    group.add_argument(
        "--tokenizer-hf-no-include-special-tokens",
        action="store_true",
        help="HuggingFaceTokenizer: do not add BOS/EOS templates",
    )
    group.add_argument("--tiktoken-pattern", default="v2", choices=["v1", "v2"])
    group.add_argument("--vocab-size", type=int, help="TikTokenizer vocabulary (default 2**17)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    group.add_argument("--append-eod", action="store_true", help="append EOD to each document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="output path without suffix")
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer threads (default: all cores)",
    )
    group.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="Megatron's partition count; only changes document order",
    )
    group.add_argument(
        "--log-interval", type=int, default=1000, help="documents between progress lines"
    )
    args = parser.parse_args(argv)
    for flag in ("workers", "partitions", "log_interval"):
        if getattr(args, flag) < 1:
            parser.error(
                f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
            )
    return args


def input_files(pattern: str) -> list[str]:
    """The files `--input` names: one path, or every match of a glob (sorted)."""
    if os.path.isfile(pattern):
        return [pattern]
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"error: --input {pattern}: no such file (and no glob match)")
    return files


def open_lines(path: str) -> io.BufferedIOBase:
    """A binary stream of the decompressed file (gzip by `.gz`, zstd by `.zst`)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as error:
            message = f"error: --input {path}: reading .zst needs `pip install zstandard`"
            raise SystemExit(message) from error
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def check_output_prefix(prefix: str) -> None:
    """Create the output directory, and fail now (not after hours of work) if it is unwritable."""
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        message = f"error: --output-prefix {prefix}: cannot write to {directory}: {error}"
        raise SystemExit(message) from error


@dataclass
class Stats:
    """Counters for the progress line and the summary."""

    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def progress(self, total_bytes: int | None) -> str:
        """One progress line: a bar when the input size is known, then counts and rates."""
        bar = ""
        if total_bytes:
            done = min(self.input_bytes / total_bytes, 1.0)
            filled = int(done * 30)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done:6.1%} "
        return f"{bar}{self.documents:,} documents ({self.rates()})"

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (
            f"{self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s, "
            f"{self.input_bytes / elapsed / 2**20:.2f} MB/s"
        )


@dataclass
class Batch:
    """Parsed lines: per key, the texts (sentences) of each valid line, and its partition."""

    texts: dict[str, list[str]]
    sentences: dict[str, list[int]]  # per key: how many texts each document has
    partitions: list[int]
    input_bytes: int


def parse_line(line: bytes, keys: list[str]) -> tuple[dict[str, list[str]] | None, str]:
    """The texts of each key of one JSONL line, or (None, why it is malformed)."""
    if not line.strip():
        return None, "empty line"
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"invalid JSON ({error.msg if hasattr(error, 'msg') else error})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    texts = {}
    for key in keys:
        if key not in record:
            return None, f"missing key {key!r}"
        value = record[key]
        if isinstance(value, str):
            texts[key] = [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            texts[key] = value  # pre-split sentences, as Megatron accepts
        else:
            return None, f"key {key!r} is {type(value).__name__}, expected a string"
    return texts, ""


def read_batches(args: argparse.Namespace, stats: Stats) -> Iterator[Batch]:
    """Stream the input as parsed batches, recording (or, with --strict, raising) bad lines."""
    line_number = 0  # over all files, as Megatron's round-robin partitioning counts them
    for path in input_files(args.input):
        with open_lines(path) as stream:
            batch = _new_batch(args.json_keys)
            for file_line, line in enumerate(stream, start=1):
                partition = line_number % args.partitions
                line_number += 1
                texts, problem = parse_line(line, args.json_keys)
                batch.input_bytes += len(line)
                if texts is None:
                    where = f"{path}:{file_line}: {problem}"
                    if args.strict:
                        raise SystemExit(f"error: malformed input line (--strict): {where}")
                    stats.malformed += 1
                    if len(stats.examples) < _REPORTED_MALFORMED:
                        stats.examples.append(where)
                    continue
                for key, values in texts.items():
                    batch.texts[key].extend(values)
                    batch.sentences[key].append(len(values))
                batch.partitions.append(partition)
                if len(batch.partitions) >= _BATCH_LINES or batch.input_bytes >= _BATCH_BYTES:
                    yield batch
                    batch = _new_batch(args.json_keys)
            if batch.partitions or batch.input_bytes:
                yield batch


def _new_batch(keys: list[str]) -> Batch:
    return Batch({k: [] for k in keys}, {k: [] for k in keys}, [], 0)


def encode_batch(batch: Batch, tokenizer: Tokenizer, args: argparse.Namespace) -> dict:
    """Token ids of every text in the batch, per key (runs while the next batch is parsed)."""
    return {
        key: tokenizer.tokenize_batch(texts, num_threads=args.workers)
        for key, texts in batch.texts.items()
    }


def write_batch(
    batch: Batch,
    ids: dict[str, list[list[int]]],
    builders: dict[tuple[str, int], IndexedDatasetBuilder],
    eod: int | None,
    stats: Stats,
) -> None:
    """Append the batch's documents to the builder of their key and partition."""
    for key, sentence_ids in ids.items():
        sequences, per_doc = _documents(sentence_ids, batch.sentences[key], eod)
        if len(builders) == len(ids):  # one partition: no regrouping
            stats.tokens += _append(builders[key, 0], sequences, per_doc)
            continue
        partitions = np.asarray(batch.partitions)
        seq_partition = np.repeat(partitions, per_doc)
        for partition in np.unique(partitions).tolist():
            chosen = np.flatnonzero(seq_partition == partition).tolist()
            stats.tokens += _append(
                builders[key, partition],
                [sequences[i] for i in chosen],
                [n for n, p in zip(per_doc, batch.partitions, strict=True) if p == partition],
            )
    stats.documents += len(batch.partitions)
    stats.input_bytes += batch.input_bytes


def _documents(
    sentence_ids: list[list[int]], counts: list[int], eod: int | None
) -> tuple[list[list[int]], list[int]]:
    """Non-empty sequences in order and how many each document has (EOD on the last one)."""
    if len(sentence_ids) == len(counts):  # one text per document: the common, fast case
        sequences = [ids for ids in sentence_ids if ids]
        per_doc = [1 if ids else 0 for ids in sentence_ids]
    else:
        sequences, per_doc, start = [], [], 0
        for count in counts:
            kept = [ids for ids in sentence_ids[start : start + count] if ids]
            start += count
            sequences.extend(kept)
            per_doc.append(len(kept))
    if eod is not None:
        # The encoder's lists are ours: append in place rather than copy every document.
        ends = np.cumsum(per_doc)
        for end, n in zip(ends.tolist(), per_doc, strict=True):
            if n:
                sequences[end - 1].append(eod)
    return sequences, per_doc


def _append(builder: IndexedDatasetBuilder, sequences: list[list[int]], per_doc: list[int]) -> int:
    lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
    total = int(lengths.sum())
    # Straight into the file's dtype: one pass over the Python ints, no int64 copy.
    tokens = np.fromiter(chain.from_iterable(sequences), builder.dtype, total)
    builder.add_documents(tokens, lengths, np.asarray(per_doc, np.int64))
    return total


def output_prefix(args: argparse.Namespace, key: str, partition: int | None = None) -> str:
    """Megatron's names: `{prefix}_{key}_document`, partitions as `{prefix}_{p}_{key}_document`."""
    prefix = args.output_prefix if partition is None else f"{args.output_prefix}_{partition}"
    return f"{prefix}_{key}_document"


def preprocess(args: argparse.Namespace) -> Stats:
    """Tokenize `args.input` into indexed datasets; return the counters."""
    files = input_files(args.input)
    check_output_prefix(args.output_prefix)
    # HuggingFace tokenizers size their Rust thread pool from this on first use.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))
    tokenizer = build_tokenizer(
        args.tokenizer_type,
        args.tokenizer_model,
        hf_include_special_tokens=not args.tokenizer_hf_no_include_special_tokens,
        tiktoken_pattern=args.tiktoken_pattern,
        vocab_size=args.vocab_size,
        tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
    )
    dtype = optimal_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod if args.append_eod else None
    builders = {
        (key, p): IndexedDatasetBuilder(
            output_prefix(args, key, p if args.partitions > 1 else None) + ".bin", dtype
        )
        for key in args.json_keys
        for p in range(args.partitions)
    }
    stats = Stats()
    # The fraction done is known only for uncompressed input (bytes read of the file sizes).
    compressed = any(f.endswith((".gz", ".zst")) for f in files)
    total_bytes = None if compressed else sum(os.path.getsize(f) for f in files)
    print(f"Opening {', '.join(files)}", file=sys.stderr)
    next_report = args.log_interval
    try:
        with ThreadPoolExecutor(1) as encoder:
            pending = None
            # Encode batch k on the tokenizer's threads while batch k+1 is read and parsed.
            for batch in read_batches(args, stats):
                future = encoder.submit(encode_batch, batch, tokenizer, args)
                if pending is not None:
                    write_batch(*pending[0], pending[1].result(), builders, eod, stats)
                pending = ((batch,), future)
                if stats.documents >= next_report:
                    print(stats.progress(total_bytes), file=sys.stderr)
                    next_report = (stats.documents // args.log_interval + 1) * args.log_interval
            if pending is not None:
                write_batch(*pending[0], pending[1].result(), builders, eod, stats)
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    for (key, p), builder in builders.items():
        builder.finalize(output_prefix(args, key, p if args.partitions > 1 else None) + ".idx")
    if args.partitions > 1:
        _merge_partitions(args, dtype)
    return stats


def _merge_partitions(args: argparse.Namespace, dtype: type[np.number]) -> None:
    for key in args.json_keys:
        merged = IndexedDatasetBuilder(output_prefix(args, key) + ".bin", dtype)
        for p in range(args.partitions):
            merged.add_index(output_prefix(args, key, p))
        merged.finalize(output_prefix(args, key) + ".idx")
        for p in range(args.partitions):
            for suffix in (".bin", ".idx"):
                os.remove(output_prefix(args, key, p) + suffix)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the progress and a summary to stderr."""
    args = get_args(argv)
    stats = preprocess(args)
    elapsed = time.perf_counter() - stats.start
    print(
        f"Done: {stats.documents:,} documents, {stats.tokens:,} tokens, "
        f"{stats.input_bytes / 2**20:.2f} MB in {elapsed:.2f} s ({stats.rates()})",
        file=sys.stderr,
    )
    for key in args.json_keys:
        print(f"  wrote {output_prefix(args, key)}.bin/.idx", file=sys.stderr)
    if stats.malformed:
        print(f"Skipped {stats.malformed:,} malformed lines; the first:", file=sys.stderr)
        for example in stats.examples:
            print(f"  {example}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
