"""JSONL (plain, .gz, .zst), Parquet or Arrow -> `{output_prefix}_{key}_document.bin/.idx`.

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

How it differs:

- Parquet and Arrow files (IPC file or stream format, as HuggingFace datasets caches) are read
  too, in bounded record batches; a row is the document its columns would be as a JSONL
  record (`--json-keys` name columns), so the same records give the same bytes.
- Before any work: the input exists, the output directory is writable, the tokenizer loads,
  and every `--json-keys` key is in each file (its first JSONL records, its Arrow schema).
  Errors are one line, `preprocess_data.py: error: ...`: status 2 for a bad flag, file, key
  or tokenizer, 1 for bad content (a malformed line under `--strict`, no document at all).
- The input is streamed in bounded batches (memory does not grow with the corpus), the
  tokenizer's own threaded batch encoder does the work (`--workers` threads) while the next
  batch is parsed, and malformed lines are counted, reported with line numbers and skipped
  (or fatal with `--strict`) instead of crashing the run.
- Long texts are tokenized in pieces cut at spaces where that provably gives the tokens of the
  whole text (SentencePiece BPE models such as LLaMA-2's), so a 50 MB document takes a
  bounded amount of memory.
- Outputs are written under staging names and renamed into place only when the whole run has
  succeeded: a failed run leaves what earlier runs wrote as it was, and nothing half-written.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype  # noqa: E402
from engine.data.input_files import (  # noqa: E402
    InputError,
    InputFile,
    TableFile,
    check_inputs,
    input_files,
    one_line,
    parse_line,
    read_lines,
    row_texts,
)
from engine.data.long_texts import (  # noqa: E402
    PIECE_CHARS,
    SENTENCEPIECE_CUTS,
    CutRule,
    TokenIds,
    cut_rule,
    tokenize_texts,
)
from engine.data.tokenizer import (  # noqa: E402
    TOKENIZER_TYPES,
    Tokenizer,
    build_tokenizer,
)
from engine.progress import Progress  # noqa: E402

PROG = "preprocess_data.py"
_BATCH_LINES = 1024
_BATCH_BYTES = 2 << 20  # a batch holds at most this much JSON (plus one line)
_REPORTED_MALFORMED = 10


class PreprocessError(SystemExit):
    """A bad flag, file, key or tokenizer: `main` prints `preprocess_data.py: error: <message>`
    (one line, no traceback) and exits with `status`, 2 as argparse does for bad flags.

    A SystemExit, so that a script calling `preprocess()` still stops with the message.
    """

    status = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DataError(PreprocessError):
    """The input's content is unusable (a malformed line under --strict, no documents)."""

    status = 1


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse Megatron-LM's preprocessing flags (plus `--strict`)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        required=True,
        help="JSONL file (.gz/.zst ok), Parquet or Arrow file, or a glob of them",
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys (columns) to tokenize"
    )
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
    if args.tokenizer_model is None:
        parser.error(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    twice = sorted({key for key in args.json_keys if args.json_keys.count(key) > 1})
    if twice:
        parser.error(f"--json-keys {' '.join(args.json_keys)}: {', '.join(twice)} given twice")
    return args


# ---------------------------------------------------------------------------- input files


def check_output_prefix(prefix: str) -> None:
    """Create the output directory, and fail now (not after hours of work) if it is unwritable."""
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        message = f"--output-prefix {prefix}: cannot write to {directory}: {error}"
        raise PreprocessError(message) from error


def load_tokenizer(args: argparse.Namespace) -> tuple[Tokenizer, type[np.number], int | None]:
    """The tokenizer, the token dtype and the EOD id (None without --append-eod); a missing
    or unreadable model file is an error naming it, before any input is read."""
    # HuggingFace tokenizers size their Rust thread pool from this on first use.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))
    try:
        tokenizer = build_tokenizer(
            args.tokenizer_type,
            args.tokenizer_model,
            hf_include_special_tokens=not args.tokenizer_hf_no_include_special_tokens,
            tiktoken_pattern=args.tiktoken_pattern,
            vocab_size=args.vocab_size,
            tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
        )
        dtype = optimal_dtype(tokenizer.vocab_size)
        eod = tokenizer.eod if args.append_eod else None  # a HF tokenizer may have none
    # Each library raises its own kind (RuntimeError, OSError, the Rust bindings' Exception,
    # JSON and key errors): all of them mean this file is not a usable tokenizer.
    except Exception as error:
        reason = one_line(error)
        if not reason.startswith("--"):  # the engine's messages name their flag already
            reason = (
                f"--tokenizer-model {args.tokenizer_model}: cannot load it as a "
                f"{args.tokenizer_type}: {reason}"
            )
        raise PreprocessError(reason) from error
    return tokenizer, dtype, eod


# ------------------------------------------------------------------------------ parsing


@dataclass
class Stats:
    """Counters for the progress line and the summary."""

    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    records: int = 0  # lines and rows read, malformed ones included
    malformed: int = 0
    examples: list[str] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def show(self, progress: Progress, force: bool = False) -> None:
        """Advance ``progress`` (counting input bytes) to these counts."""
        progress.update(
            self.input_bytes,
            counters={"docs": self.documents, "tokens": self.tokens},
            fields={"documents": f"{self.documents:,}"},
            force=force,
        )

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


def read_batches(args: argparse.Namespace, files: list[InputFile], stats: Stats) -> Iterator[Batch]:
    """Stream the input as parsed batches, recording (or, with --strict, raising) bad lines."""
    # Lines and rows over all files, as Megatron's round-robin partitioning counts them.
    numbers = itertools.count()
    for file in files:
        if file.kind == "jsonl":
            yield from _jsonl_batches(file.path, args, stats, numbers)
        else:
            yield from _table_batches(file, args, stats, numbers)


def _jsonl_batches(
    path: str, args: argparse.Namespace, stats: Stats, numbers: Iterator[int]
) -> Iterator[Batch]:
    batch = _new_batch(args.json_keys)
    for file_line, line in enumerate(read_lines(path), start=1):
        partition = next(numbers) % args.partitions
        stats.records += 1
        texts, problem = parse_line(line, args.json_keys)
        batch.input_bytes += len(line)
        if texts is None:
            _malformed(f"{path}:{file_line}: {problem}", args, stats)
            continue
        _add(batch, texts, partition)
        if len(batch.partitions) >= _BATCH_LINES or batch.input_bytes >= _BATCH_BYTES:
            yield batch
            batch = _new_batch(args.json_keys)
    if batch.partitions or batch.input_bytes:
        yield batch


def _table_batches(
    file: InputFile, args: argparse.Namespace, stats: Stats, numbers: Iterator[int]
) -> Iterator[Batch]:
    """A Parquet or Arrow file as batches: each record batch in slices of at most
    `_BATCH_LINES` rows and, by its average row, about `_BATCH_BYTES`."""
    row_number = 0
    for record_batch in TableFile(file.path, file.kind).batches(args.json_keys):
        rows = record_batch.num_rows
        per_slice = max(1, min(_BATCH_LINES, rows * _BATCH_BYTES // max(record_batch.nbytes, 1)))
        for start in range(0, rows, per_slice):
            part = record_batch.slice(start, per_slice)
            try:
                columns = {key: part.column(key).to_pylist() for key in args.json_keys}
            except UnicodeDecodeError as error:
                where = f"rows {row_number + 1}-{row_number + part.num_rows}"
                message = f"--input {file.path}: {where}: invalid UTF-8: {error}"
                raise PreprocessError(message) from error
            batch = _new_batch(args.json_keys)
            batch.input_bytes = part.nbytes
            for row in range(part.num_rows):
                partition = next(numbers) % args.partitions
                row_number += 1
                stats.records += 1
                texts, problem = row_texts(columns, row)
                if texts is None:
                    _malformed(f"{file.path}: row {row_number}: {problem}", args, stats)
                    continue
                _add(batch, texts, partition)
            yield batch


def _malformed(where: str, args: argparse.Namespace, stats: Stats) -> None:
    """Count and remember a malformed line or row; with --strict, stop at it."""
    if args.strict:
        raise DataError(f"malformed input line (--strict): {where}")
    stats.malformed += 1
    if len(stats.examples) < _REPORTED_MALFORMED:
        stats.examples.append(where)


def _add(batch: Batch, texts: dict[str, list[str]], partition: int) -> None:
    for key, values in texts.items():
        batch.texts[key].extend(values)
        batch.sentences[key].append(len(values))
    batch.partitions.append(partition)


def _new_batch(keys: list[str]) -> Batch:
    return Batch({k: [] for k in keys}, {k: [] for k in keys}, [], 0)


# --------------------------------------------------------------------------- tokenizing


def encode_batch(
    batch: Batch,
    tokenizer: Tokenizer,
    args: argparse.Namespace,
    piece_chars: int | None = None,
    dtype: type[np.number] = np.int32,
    rule: CutRule = SENTENCEPIECE_CUTS,
) -> dict[str, list[TokenIds]]:
    """Token ids of every text in the batch, per key (runs while the next batch is parsed)."""
    return {
        key: tokenize_texts(texts, tokenizer, args.workers, piece_chars, dtype, rule)
        for key, texts in batch.texts.items()
    }


# ------------------------------------------------------------------------------ writing


def write_batch(
    batch: Batch,
    ids: dict[str, list[TokenIds]],
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
    sentence_ids: list[TokenIds], counts: list[int], eod: int | None
) -> tuple[list[TokenIds], list[int]]:
    """Non-empty sequences in order and how many each document has (EOD on the last one)."""
    if len(sentence_ids) == len(counts):  # one text per document: the common, fast case
        sequences = [ids for ids in sentence_ids if len(ids)]
        per_doc = [1 if len(ids) else 0 for ids in sentence_ids]
    else:
        sequences, per_doc, start = [], [], 0
        for count in counts:
            kept = [ids for ids in sentence_ids[start : start + count] if len(ids)]
            start += count
            sequences.extend(kept)
            per_doc.append(len(kept))
    if eod is not None:
        # The encoder's lists are ours: append in place rather than copy every document.
        ends = np.cumsum(per_doc)
        for end, n in zip(ends.tolist(), per_doc, strict=True):
            if n:
                last = sequences[end - 1]
                if isinstance(last, list):
                    last.append(eod)
                else:  # a long text's array
                    sequences[end - 1] = np.append(last, np.asarray(eod, last.dtype))
    return sequences, per_doc


def _append(builder: IndexedDatasetBuilder, sequences: list[TokenIds], per_doc: list[int]) -> int:
    lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
    total = int(lengths.sum())
    if any(isinstance(ids, np.ndarray) for ids in sequences):  # a long text's array among them
        tokens = np.concatenate([np.asarray(ids, builder.dtype) for ids in sequences])
    else:
        # Straight into the file's dtype: one pass over the Python ints, no int64 copy.
        tokens = np.fromiter(chain.from_iterable(sequences), builder.dtype, total)
    builder.add_documents(tokens, lengths, np.asarray(per_doc, np.int64))
    return total


def output_prefix(args: argparse.Namespace, key: str) -> str:
    """Megatron's name of a key's output: `{prefix}_{key}_document` (.bin/.idx)."""
    return f"{args.output_prefix}_{key}_document"


def staging_prefix(args: argparse.Namespace, key: str, partition: int | None = None) -> str:
    """Where a key's output (or one partition of it) is written until the run has succeeded:
    beside the final files (so the rename stays on one file system), named for this process."""
    prefix = f"{output_prefix(args, key)}.partial{os.getpid()}"
    return prefix if partition is None else f"{prefix}_{partition}"


# ------------------------------------------------------------------------------ the run


def preprocess(args: argparse.Namespace) -> Stats:
    """Tokenize `args.input` into indexed datasets; return the counters.

    Checks come first and in this order, each before the work it guards: the input exists,
    the output directory is writable, the tokenizer loads, every file holds the keys.
    """
    try:
        return _preprocess(args)
    except InputError as error:  # a file that cannot be read: found before or during the run
        raise PreprocessError(error.message) from error


def _preprocess(args: argparse.Namespace) -> Stats:
    paths = input_files(args.input)
    check_output_prefix(args.output_prefix)
    tokenizer, dtype, eod = load_tokenizer(args)
    files = check_inputs(paths, args.json_keys)
    rule = cut_rule(tokenizer)
    piece_chars = PIECE_CHARS if rule else None
    # The fraction done is known only for plain JSONL (bytes read of the file sizes).
    plain = all(f.kind == "jsonl" and not f.path.endswith((".gz", ".zst")) for f in files)
    total_bytes = sum(os.path.getsize(f.path) for f in files) if plain else None
    print(f"Opening {', '.join(paths)}", file=sys.stderr)
    partitioned = args.partitions > 1
    builders = {
        (key, p): IndexedDatasetBuilder(
            staging_prefix(args, key, p if partitioned else None) + ".bin", dtype
        )
        for key in args.json_keys
        for p in range(args.partitions)
    }
    staged: list[str] = []  # finished staging pairs, removed if the run fails after all
    stats = Stats()
    next_report = args.log_interval
    # Input MB against the total when known: the bar, rates and ETA (`engine.progress`).
    progress = Progress(total_bytes, "MB", label="preprocess", scale=2**20)
    try:
        with ThreadPoolExecutor(1) as encoder:
            pending = None
            # Encode batch k on the tokenizer's threads while batch k+1 is read and parsed.
            for batch in read_batches(args, files, stats):
                future = encoder.submit(
                    encode_batch, batch, tokenizer, args, piece_chars, dtype, rule
                )
                if pending is not None:
                    write_batch(pending[0], pending[1].result(), builders, eod, stats)
                pending = (batch, future)
                report = stats.documents >= next_report  # --log-interval: a line regardless
                stats.show(progress, force=report)
                if report:
                    next_report = (stats.documents // args.log_interval + 1) * args.log_interval
            if pending is not None:
                write_batch(pending[0], pending[1].result(), builders, eod, stats)
        if stats.documents == 0:
            raise DataError(_no_documents(args.input, stats))
        stats.show(progress)
        progress.close()
        for (key, p), builder in builders.items():
            prefix = staging_prefix(args, key, p if partitioned else None)
            staged.append(prefix)
            builder.finalize(prefix + ".idx")
        if partitioned:
            _merge_partitions(args, dtype, builders, staged)
        # Every output is complete: only now replace what an earlier run wrote.
        for key in args.json_keys:
            for suffix in (".bin", ".idx"):
                os.replace(staging_prefix(args, key) + suffix, output_prefix(args, key) + suffix)
    except BaseException:
        progress.clear()  # the error starts its own line on a terminal
        for builder in builders.values():
            builder.abort()  # also safe after finalize: it removes only its temporary files
        for prefix in staged:
            for suffix in (".bin", ".idx"):
                Path(prefix + suffix).unlink(missing_ok=True)
        raise
    return stats


def _no_documents(pattern: str, stats: Stats) -> str:
    """Why a run wrote nothing, in one line naming the input."""
    if not stats.records:
        return f"--input {pattern}: no documents: the input is empty"
    return (
        f"--input {pattern}: no documents: all {stats.records:,} lines/rows are malformed "
        f"(the first: {stats.examples[0]})"
    )


def _merge_partitions(
    args: argparse.Namespace,
    dtype: type[np.number],
    builders: dict[tuple[str, int], IndexedDatasetBuilder],
    staged: list[str],
) -> None:
    """Concatenate each key's partitions in order (Megatron's document order) into the key's
    staging pair, then drop the partitions."""
    for key in args.json_keys:
        merged = IndexedDatasetBuilder(staging_prefix(args, key) + ".bin", dtype)
        builders[key, -1] = merged  # aborted with the rest if the merge fails
        for p in range(args.partitions):
            merged.add_index(staging_prefix(args, key, p))
        staged.append(staging_prefix(args, key))
        merged.finalize(staging_prefix(args, key) + ".idx")
        for p in range(args.partitions):
            for suffix in (".bin", ".idx"):
                os.remove(staging_prefix(args, key, p) + suffix)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the progress and a summary to stderr."""
    args = get_args(argv)
    try:
        stats = preprocess(args)
    except PreprocessError as error:
        print(f"{PROG}: error: {error.message}", file=sys.stderr)
        return error.status
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
