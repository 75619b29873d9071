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
import glob
import gzip
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype  # noqa: E402
from engine.data.tokenizer import (  # noqa: E402
    TOKENIZER_TYPES,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

PROG = "preprocess_data.py"
_BATCH_LINES = 1024
_BATCH_BYTES = 2 << 20  # a batch holds at most this much JSON (plus one line)
_REPORTED_MALFORMED = 10
_PEEK_LINES = 100  # JSONL lines read per file to check --json-keys before the run
_PEEK_BYTES = 16 << 20  # ... or fewer, once this much has been read
_PIECE_CHARS = 1 << 18  # a longer text is tokenized in pieces of about this many characters
_CHARS_IN_FLIGHT = 8 << 20  # at most this much of one long text is being tokenized at once
_PARQUET_SUFFIXES = (".parquet",)
_ARROW_SUFFIXES = (".arrow", ".feather")

TokenIds = list[int] | np.ndarray
"""One text's ids: the tokenizer's list, or an array for a text tokenized in pieces."""


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


@dataclass(frozen=True)
class InputFile:
    """One file `--input` names and how it is read: "jsonl", "parquet" or "arrow"."""

    path: str
    kind: str


def input_files(pattern: str) -> list[str]:
    """The files `--input` names: one path, or every match of a glob (sorted)."""
    if os.path.isfile(pattern):
        return [pattern]
    files = sorted(glob.glob(pattern))
    if not files:
        raise PreprocessError(f"--input {pattern}: no such file (and no glob match)")
    return files


def input_format(path: str) -> str:
    """How to read `path`: by its suffix (.parquet; .arrow, .feather), else by its first bytes
    (the Parquet and Arrow magic numbers, so a misnamed file still reads), else as JSONL."""
    name = path.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_ARROW_SUFFIXES):
        return "arrow"
    if name.endswith((".gz", ".zst")):
        return "jsonl"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as error:
        raise PreprocessError(f"--input {path}: cannot read it: {error}") from error
    if head.startswith(b"PAR1"):
        return "parquet"
    # An Arrow IPC file starts with ARROW1, a stream with the 0xFFFFFFFF continuation marker
    # (never the start of UTF-8 text).
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):
        return "arrow"
    return "jsonl"


def open_lines(path: str) -> io.BufferedIOBase:
    """A binary stream of the decompressed file (gzip by `.gz`, zstd by `.zst`)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as error:
            message = f"--input {path}: reading .zst needs `pip install zstandard`"
            raise PreprocessError(message) from error
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _read_errors() -> tuple[type[Exception], ...]:
    """What a corrupt or unreadable input raises while it is read (zstd's own error too)."""
    zstandard = sys.modules.get("zstandard")
    return (OSError, EOFError) + ((zstandard.ZstdError,) if zstandard else ())


def read_lines(path: str) -> Iterator[bytes]:
    """The lines of a JSONL file; an unreadable or corrupt file is an error naming it."""
    try:
        with open_lines(path) as stream:
            yield from stream
    except _read_errors() as error:
        raise PreprocessError(f"--input {path}: cannot read it: {error}") from error


def _import_pyarrow(path: str) -> ModuleType:
    """pyarrow (with its parquet and ipc modules), imported only when such a file is given."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as error:
        message = f"--input {path}: reading Parquet or Arrow needs `pip install pyarrow`"
        raise PreprocessError(message) from error
    return pyarrow


class TableFile:
    """A Parquet or Arrow IPC file (file or stream format): its schema, then its record
    batches, each read when it is needed (Parquet row groups decoded one at a time, Arrow
    memory-mapped)."""

    def __init__(self, path: str, kind: str) -> None:
        pa = self.pyarrow = _import_pyarrow(path)
        self.path = path
        self._parquet: Any = None  # a pyarrow.parquet.ParquetFile
        self._reader: Any = None  # an Arrow IPC file or stream reader
        try:
            if kind == "parquet":
                self._parquet = pa.parquet.ParquetFile(path)
                self.schema = self._parquet.schema_arrow
            else:
                source = pa.memory_map(path)
                try:  # the IPC file format first; HF datasets' cache files are streams
                    self._reader = pa.ipc.open_file(source)
                except pa.ArrowInvalid:
                    source.seek(0)
                    self._reader = pa.ipc.open_stream(source)
                self.schema = self._reader.schema
        except (pa.ArrowException, OSError) as error:
            what = "Parquet" if kind == "parquet" else "Arrow IPC"
            message = f"--input {path}: not a readable {what} file: {_one_line(error)}"
            raise PreprocessError(message) from error

    def batches(self, columns: list[str]) -> Iterator[Any]:
        """Record batches of `columns` in row order; a corrupt file is an error naming it."""
        pa = self.pyarrow
        try:
            if self._parquet is not None:
                yield from self._parquet.iter_batches(batch_size=_BATCH_LINES, columns=columns)
            elif isinstance(self._reader, pa.ipc.RecordBatchFileReader):
                for i in range(self._reader.num_record_batches):
                    yield self._reader.get_batch(i).select(columns)
            else:
                for batch in self._reader:
                    yield batch.select(columns)
        except (pa.ArrowException, OSError) as error:
            message = f"--input {self.path}: cannot read it: {_one_line(error)}"
            raise PreprocessError(message) from error


def _is_text_type(pa: ModuleType, arrow_type: Any) -> bool:
    """Whether a column holds what a JSONL value may be: strings, or lists of strings."""
    types = pa.types
    if types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if types.is_list(arrow_type) or types.is_large_list(arrow_type):
        arrow_type = arrow_type.value_type
    return (
        types.is_string(arrow_type)
        or types.is_large_string(arrow_type)
        or (hasattr(types, "is_string_view") and types.is_string_view(arrow_type))
    )


def check_inputs(paths: list[str], keys: list[str]) -> list[InputFile]:
    """Each file's format, checked to hold `keys` (the first JSONL records, the Arrow
    schema) before any work: a typo is an error in a second, not after a day's tokenizing."""
    files = []
    for path in paths:
        kind = input_format(path)
        if kind == "jsonl":
            present = _jsonl_keys(path, keys)
            # No JSON object among the first lines: the run reports them as malformed.
            if present is not None:
                _check_keys(path, keys, present, "its records have keys")
        else:
            table = TableFile(path, kind)
            _check_keys(path, keys, table.schema.names, "its columns are")
            for key in keys:
                column_type = table.schema.field(key).type
                if not _is_text_type(table.pyarrow, column_type):
                    raise PreprocessError(
                        f"--json-keys {key!r} in {path} is a column of {column_type}: "
                        "expected strings (or lists of strings)"
                    )
        files.append(InputFile(path, kind))
    return files


def _jsonl_keys(path: str, wanted: list[str]) -> list[str] | None:
    """The keys of the JSON objects among a JSONL file's first lines, in the order seen
    (reading stops once all of `wanted` are seen); None where none of them is an object."""
    keys: dict[str, None] = {}
    objects, read = 0, 0
    for number, line in enumerate(read_lines(path)):
        read += len(line)
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
            record = None
        if isinstance(record, dict):
            objects += 1
            keys.update(dict.fromkeys(record))
            if all(key in keys for key in wanted):
                break
        if number + 1 >= _PEEK_LINES or read >= _PEEK_BYTES:
            break
    return list(keys) if objects else None


def _check_keys(path: str, keys: list[str], present: list[str], what: str) -> None:
    """An error listing what `path` has, if some of `keys` are not in `present`."""
    missing = [key for key in keys if key not in present]
    if not missing:
        return
    listed = ", ".join(present) if present else "none"
    message = f"--json-keys {', '.join(map(repr, missing))} not in {path}: {what} {listed}"
    if any("," in key for key in missing):
        # `--json-keys text,title` is one key named "text,title"; Megatron's flag takes
        # several keys separated by spaces.
        split = " ".join(part.strip() for key in keys for part in key.split(",") if part.strip())
        message += f" (separate keys with spaces: --json-keys {split})"
    raise PreprocessError(message)


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
        reason = _one_line(error)
        if not reason.startswith("--"):  # the engine's messages name their flag already
            reason = (
                f"--tokenizer-model {args.tokenizer_model}: cannot load it as a "
                f"{args.tokenizer_type}: {reason}"
            )
        raise PreprocessError(reason) from error
    return tokenizer, dtype, eod


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (some libraries' span several)."""
    return " ".join(str(error).split()) or type(error).__name__


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
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
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
    # json.loads lets an unpaired surrogate through (a \ud800 escape, or its raw bytes),
    # which no tokenizer can encode; checked only where the line could hold one.
    if b"\\ud" in line or b"\\uD" in line or b"\xed" in line:
        for key, values in texts.items():
            if not all(_encodable(value) for value in values):
                return None, f"key {key!r} holds an unpaired surrogate (not valid Unicode)"
    return texts, ""


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def row_texts(columns: dict[str, list], row: int) -> tuple[dict[str, list[str]] | None, str]:
    """The texts of each key of one Arrow row, or (None, why it is unusable): the JSONL rules,
    with Arrow's nulls where JSON could have had anything else."""
    texts = {}
    for key, values in columns.items():
        value = values[row]
        if isinstance(value, str):
            texts[key] = [value]
        elif value is None:
            return None, f"key {key!r} is null"
        elif all(isinstance(v, str) for v in value):
            texts[key] = value
        else:
            return None, f"key {key!r} holds a null among its strings"
    return texts, ""


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

# A space that follows a non-space: the first of a run of spaces, where long texts are cut.
_CUT = re.compile(r"(?<! ) ")


def text_pieces(text: str, piece_chars: int) -> Iterator[str]:
    """`text` in pieces of at least `piece_chars` characters (but the last), each cut before
    the first space of a run of spaces. The space at a cut is left out of the piece after it:
    SentencePiece's dummy prefix "▁" stands for it there (see `cuts_keep_the_tokens`).

    A text with no such space past `piece_chars` stays whole from there (text without
    spaces, such as Chinese, is not cut).
    """
    start = 0
    while len(text) - start > piece_chars:
        cut = _CUT.search(text, start + piece_chars)
        # At the last character the piece after it would be empty, which encodes to nothing
        # rather than to the "▁" the space is.
        if cut is None or cut.start() == len(text) - 1:
            break
        yield text[start : cut.start()]
        start = cut.start() + 1
    yield text[start:]


def cuts_keep_the_tokens(model_path: str | os.PathLike) -> bool:
    """Whether this SentencePiece model gives a text's tokens when `text_pieces` are encoded
    one by one and their ids joined.

    SentencePiece normalizes the text, puts the dummy prefix "▁" in front, and BPE merges
    adjacent symbols (best-scored first) only into a vocabulary piece. If the normalizer maps
    each character on its own and the only whitespace change is " " -> "▁" (identity rules,
    no character map, no collapsing or trimming of spaces, whitespace as a prefix), then a
    piece cut before a space encodes, with its dummy prefix in place of that space, exactly
    the string the whole text has from the space on. If, further, no vocabulary piece holds
    "▁" after another character, no merge can join the symbol before the cut with the one
    after it, so both sides are merged independently, in the same order as alone: the ids
    are the same. Unigram models are not cut: their Viterbi search adds float scores across
    the cut, so a near-tie could break differently. LLaMA-2's model passes every check.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto.FromString(Path(model_path).read_bytes())
    # Without protobuf, or with a model it cannot read, keep texts whole: always correct.
    except Exception:
        return False
    bpe = sentencepiece_model_pb2.TrainerSpec.BPE
    normalizer = model.normalizer_spec
    if (
        model.trainer_spec.model_type != bpe
        or model.trainer_spec.treat_whitespace_as_suffix
        or normalizer.name != "identity"
        or normalizer.precompiled_charsmap
        or normalizer.normalization_rule_tsv
        or not normalizer.add_dummy_prefix
        or normalizer.remove_extra_whitespaces
        or not normalizer.escape_whitespaces
    ):
        return False
    joins = re.compile("[^▁]▁")  # "▁" after another character
    return not any(joins.search(piece.piece) for piece in model.pieces)


def tokenize_texts(
    texts: list[str],
    tokenizer: Tokenizer,
    workers: int,
    piece_chars: int | None,
    dtype: type[np.number],
) -> list[TokenIds]:
    """Token ids of each text, with the tokenizer's threaded batch encoder.

    With `piece_chars`, a longer text is tokenized in `text_pieces`, at most
    `_CHARS_IN_FLIGHT` characters at a time, and its ids are kept as one array of `dtype`:
    memory stays bounded (a 50 MB text tokenized whole peaked at 2.3 GB: SentencePiece's
    working state for every character at once, then 36 bytes per id as Python ints).
    """
    if piece_chars is None or all(len(text) <= piece_chars for text in texts):
        return tokenizer.tokenize_batch(texts, num_threads=workers)
    ids: list[TokenIds] = []
    short = [text for text in texts if len(text) <= piece_chars]
    short_ids = iter(tokenizer.tokenize_batch(short, num_threads=workers))
    group = max(1, min(workers, _CHARS_IN_FLIGHT // piece_chars))
    for text in texts:
        if len(text) <= piece_chars:
            ids.append(next(short_ids))
            continue
        parts = []
        pieces = text_pieces(text, piece_chars)
        while chunk := list(itertools.islice(pieces, group)):
            parts.extend(
                np.array(piece_ids, dtype)
                for piece_ids in tokenizer.tokenize_batch(chunk, num_threads=workers)
            )
        ids.append(np.concatenate(parts))
    return ids


def encode_batch(
    batch: Batch,
    tokenizer: Tokenizer,
    args: argparse.Namespace,
    piece_chars: int | None = None,
    dtype: type[np.number] = np.int32,
) -> dict[str, list[TokenIds]]:
    """Token ids of every text in the batch, per key (runs while the next batch is parsed)."""
    return {
        key: tokenize_texts(texts, tokenizer, args.workers, piece_chars, dtype)
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
    paths = input_files(args.input)
    check_output_prefix(args.output_prefix)
    tokenizer, dtype, eod = load_tokenizer(args)
    files = check_inputs(paths, args.json_keys)
    cut = isinstance(tokenizer, SentencePieceTokenizer) and cuts_keep_the_tokens(tokenizer.path)
    piece_chars = _PIECE_CHARS if cut else None
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
    try:
        with ThreadPoolExecutor(1) as encoder:
            pending = None
            # Encode batch k on the tokenizer's threads while batch k+1 is read and parsed.
            for batch in read_batches(args, files, stats):
                future = encoder.submit(encode_batch, batch, tokenizer, args, piece_chars, dtype)
                if pending is not None:
                    write_batch(pending[0], pending[1].result(), builders, eod, stats)
                pending = (batch, future)
                if stats.documents >= next_report:
                    print(stats.progress(total_bytes), file=sys.stderr)
                    next_report = (stats.documents // args.log_interval + 1) * args.log_interval
            if pending is not None:
                write_batch(pending[0], pending[1].result(), builders, eod, stats)
        if stats.documents == 0:
            raise DataError(_no_documents(args.input, stats))
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
