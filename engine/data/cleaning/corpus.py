"""Reading and writing corpora of JSON records, streamed in batches: in, JSONL (plain, ``.gz``
or ``.zst``), Parquet and Arrow (`engine.data.input_files`); out, JSONL or Parquet (``pyarrow``,
imported only for it).

A line that is not a JSON object is not fatal: it comes out as `MALFORMED` with its line
number, so the cleaning report counts it with the other removed documents.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from engine.data.input_files import TableFile, input_format, read_lines

MALFORMED = "_malformed_line"
"""The key of the stand-in record of a line that is not a JSON object (its line number)."""


def is_parquet(path: str | Path) -> bool:
    return str(path).endswith(".parquet")


def _pyarrow():
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise SystemExit("Parquet needs pyarrow: pip install pyarrow") from None
    return parquet


def open_output(path: str | Path) -> IO[str]:
    """A UTF-8 text stream writing a plain, ``.gz`` or ``.zst`` file, by its suffix."""
    name = str(path)
    if name.endswith(".gz"):
        return gzip.open(name, "wt", encoding="utf-8")
    if name.endswith(".zst"):
        import zstandard

        raw = open(name, "wb")
        stream = zstandard.ZstdCompressor().stream_writer(raw, closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8")
    return open(name, "w", encoding="utf-8")


def read_batches(path: str | Path, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """The records of ``path`` (any format `engine.data.input_files` reads) in batches of at
    most ``batch_size``; a file that cannot be read raises its `InputError`."""
    name = str(path)
    kind = input_format(name)
    if kind != "jsonl":
        for table in TableFile(name, kind).batches(None, batch_size):
            yield table.to_pylist()
        return
    batch: list[dict[str, Any]] = []
    for number, line in enumerate(read_lines(name), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
            record = None
        batch.append(record if isinstance(record, dict) else {MALFORMED: number})
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class Writer:
    """JSON lines out to JSONL (``.gz`` / ``.zst`` by suffix) or Parquet (``.parquet``: rows
    buffered into row groups of ``rows_per_group``)."""

    def __init__(self, path: str | Path, rows_per_group: int = 10_000):
        self.path = str(path)
        self.rows_per_group = rows_per_group
        self._rows: list[dict[str, Any]] = []
        self._parquet: Any = None
        self._text = None if is_parquet(path) else open_output(path)

    def write(self, line: str) -> None:
        """One record, as its JSON line (no newline)."""
        if self._text is not None:
            self._text.write(line + "\n")
            return
        self._rows.append(json.loads(line))
        if len(self._rows) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        import pyarrow as pa

        table = pa.Table.from_pylist(self._rows)
        if self._parquet is None:
            self._parquet = _pyarrow().ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table.cast(self._parquet.schema))
        self._rows = []

    def close(self) -> None:
        if self._text is not None:
            self._text.close()
            return
        self._flush()
        if self._parquet is None:  # no rows: an empty file with no columns
            import pyarrow as pa

            _pyarrow().write_table(pa.table({}), self.path)
        else:
            self._parquet.close()
