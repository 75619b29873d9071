"""The input files of the data tools (`tools/preprocess_data.py`, `tools/clean_data.py`):
JSONL (plain, ``.gz``, ``.zst``), Parquet and Arrow IPC (file or stream format, as HuggingFace
datasets caches them), found by suffix or by their first bytes, and read in bounded batches.

Problems are `InputError`s whose message names the file (and the flag that chose it), one
line, so each tool prints it as its own error.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

BATCH_ROWS = 1024
"""Rows in a record batch read from a Parquet file, by default."""
_PEEK_LINES = 100  # JSONL lines read per file to check the keys before the run
_PEEK_BYTES = 16 << 20  # ... or fewer, once this much has been read
_PARQUET_SUFFIXES = (".parquet",)
_ARROW_SUFFIXES = (".arrow", ".feather")


class InputError(ValueError):
    """An input file that cannot be used, in one line naming it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
        raise InputError(f"--input {pattern}: no such file (and no glob match)")
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
        raise InputError(f"--input {path}: cannot read it: {error}") from error
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
            raise InputError(message) from error
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
        raise InputError(f"--input {path}: cannot read it: {error}") from error


def _import_pyarrow(path: str) -> ModuleType:
    """pyarrow (with its parquet and ipc modules), imported only when such a file is given."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as error:
        message = f"--input {path}: reading Parquet or Arrow needs `pip install pyarrow`"
        raise InputError(message) from error
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
            message = f"--input {path}: not a readable {what} file: {one_line(error)}"
            raise InputError(message) from error

    def batches(self, columns: list[str] | None, rows: int = BATCH_ROWS) -> Iterator[Any]:
        """Record batches of `columns` (None: all) in row order, of at most `rows` rows when
        the file is Parquet (an Arrow file's batches are as written); a corrupt file is an
        error naming it."""
        pa = self.pyarrow
        try:
            if self._parquet is not None:
                yield from self._parquet.iter_batches(batch_size=rows, columns=columns)
                return
            if isinstance(self._reader, pa.ipc.RecordBatchFileReader):
                stored = (self._reader.get_batch(i) for i in range(self._reader.num_record_batches))
            else:
                stored = iter(self._reader)
            for batch in stored:
                yield batch if columns is None else batch.select(columns)
        except (pa.ArrowException, OSError) as error:
            message = f"--input {self.path}: cannot read it: {one_line(error)}"
            raise InputError(message) from error


def is_text_type(pa: ModuleType, arrow_type: Any) -> bool:
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


def check_inputs(paths: list[str], keys: list[str], flag: str = "--json-keys") -> list[InputFile]:
    """Each file's format, checked to hold `keys` (the first JSONL records, the Arrow
    schema) before any work: a typo is an error in a second, not after a day's tokenizing."""
    files = []
    for path in paths:
        kind = input_format(path)
        if kind == "jsonl":
            present = _jsonl_keys(path, keys)
            # No JSON object among the first lines: the run reports them as malformed.
            if present is not None:
                _check_keys(path, keys, present, "its records have keys", flag)
        else:
            table = TableFile(path, kind)
            _check_keys(path, keys, table.schema.names, "its columns are", flag)
            for key in keys:
                column_type = table.schema.field(key).type
                if not is_text_type(table.pyarrow, column_type):
                    raise InputError(
                        f"{flag} {key!r} in {path} is a column of {column_type}: "
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


def _check_keys(path: str, keys: list[str], present: list[str], what: str, flag: str) -> None:
    """An error listing what `path` has, if some of `keys` are not in `present`."""
    missing = [key for key in keys if key not in present]
    if not missing:
        return
    listed = ", ".join(present) if present else "none"
    message = f"{flag} {', '.join(map(repr, missing))} not in {path}: {what} {listed}"
    if any("," in key for key in missing):
        # `--json-keys text,title` is one key named "text,title"; Megatron's flag takes
        # several keys separated by spaces.
        split = " ".join(part.strip() for key in keys for part in key.split(",") if part.strip())
        message += f" (separate keys with spaces: {flag} {split})"
    raise InputError(message)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (some libraries' span several)."""
    return " ".join(str(error).split()) or type(error).__name__


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
