"""Token datasets on disk: `.bin/.idx` pairs byte-compatible with Megatron-Core's `MMIDIDX`.

The `.bin` file is the raw tokens of every sequence, back to back. The `.idx` file is, all
little-endian::

    magic      9 bytes   b"MMIDIDX\\x00\\x00"
    version    <Q        1
    dtype      <B        token dtype code (see `DTYPE_CODES`)
    S          <Q        number of sequences
    D          <Q        number of document-index entries (documents + 1)
    lengths    S x int32   tokens in each sequence
    pointers   S x int64   byte offset of each sequence in the `.bin`
    documents  D x int64   sequence index where each document starts; first 0, last S

A document is one or more consecutive sequences (one per document unless sentences were
split). Reads memory-map both files, so opening a terabyte dataset costs no copy and each
sample reads only its own pages.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import overload

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, S, D

# Megatron-Core's codes; the order is part of the file format.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """An `.idx`/`.bin` pair is missing, truncated or inconsistent (the message names the file)."""


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """The token dtype Megatron picks: uint16 below 65,500 vocabulary entries, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype: np.dtype | type[np.number]) -> int:
    """The `.idx` code of a token dtype (raises for dtypes the format cannot hold)."""
    try:
        return _CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        names = ", ".join(np.dtype(d).name for d in DTYPE_CODES.values())
        raise ValueError(
            f"token dtype {np.dtype(dtype).name} is not storable; use {names}"
        ) from None


def idx_path(prefix: str | os.PathLike) -> str:
    """`{prefix}.idx`."""
    return f"{os.fspath(prefix)}.idx"


def bin_path(prefix: str | os.PathLike) -> str:
    """`{prefix}.bin`."""
    return f"{os.fspath(prefix)}.bin"


def read_index_header(path: str) -> tuple[type[np.number], int, int]:
    """Check an `.idx` header and its size; return (token dtype, sequences, document entries).

    Raises:
        IndexedDatasetError: naming `path` and the first thing that is wrong with it.
    """
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise IndexedDatasetError(
            f"{path}: truncated index, {size} bytes is shorter than the {HEADER_BYTES}-byte header"
        )
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    magic = header[: len(MAGIC)]
    if magic != MAGIC:
        raise IndexedDatasetError(f"{path}: bad magic {magic!r}, expected {MAGIC!r} (MMIDIDX)")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", header, len(MAGIC))
    if version != VERSION:
        raise IndexedDatasetError(f"{path}: unsupported version {version}, expected {VERSION}")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}"
        )
    expected = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    # Multimodal datasets append one int8 mode per sequence; accept that size too.
    if size not in (expected, expected + n_seq):
        raise IndexedDatasetError(
            f"{path}: index is {size} bytes but its header promises {n_seq} sequences and "
            f"{n_doc} document entries = {expected} bytes (truncated or corrupt)"
        )
    return DTYPE_CODES[code], n_seq, n_doc


class IndexedDataset:
    """Read-only, memory-mapped view of a `{prefix}.bin/.idx` pair.

    ``ds[i]`` is sequence ``i`` (a zero-copy numpy view), ``ds[a:b]`` a list of them,
    ``ds.get(i, offset, length)`` a token slice of one sequence and ``ds.document(d)`` all the
    tokens of document ``d``.

    Args:
        path_prefix: path without the `.bin`/`.idx` suffix.
        verify_pointers: also check every byte pointer against the lengths (reads the whole
            index once; the cheap checks of header, sizes and end points always run).
    """

    def __init__(self, path_prefix: str | os.PathLike, verify_pointers: bool = False):
        self.path_prefix = os.fspath(path_prefix)
        self._verify_pointers = verify_pointers
        self._open()

    def _open(self) -> None:
        ipath, bpath = idx_path(self.path_prefix), bin_path(self.path_prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: missing (indexed dataset needs .idx and .bin)")
        self.dtype, n_seq, n_doc = read_index_header(ipath)
        itemsize = np.dtype(self.dtype).itemsize
        index = np.memmap(ipath, mode="r", dtype=np.uint8)
        self._index_mmap = index
        offset = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(index, np.int32, n_seq, offset)
        offset += 4 * n_seq
        self.sequence_pointers = np.frombuffer(index, np.int64, n_seq, offset)
        offset += 8 * n_seq
        self.document_indices = np.frombuffer(index, np.int64, n_doc, offset)

        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            first = self.document_indices[0] if n_doc else None
            last = self.document_indices[-1] if n_doc else None
            raise IndexedDatasetError(
                f"{ipath}: document index must run from 0 to {n_seq} (the sequence count), "
                f"found first={first} last={last}"
            )
        bin_size = os.path.getsize(bpath)
        if n_seq:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        else:
            end = 0
        if end != bin_size:
            raise IndexedDatasetError(
                f"{bpath}: data file is {bin_size} bytes but {ipath} says its sequences end at "
                f"byte {end} ({np.dtype(self.dtype).name} tokens); truncated or mismatched pair"
            )
        if self._verify_pointers and n_seq:
            expected = np.zeros(n_seq, np.int64)
            np.cumsum(self.sequence_lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
            bad = np.flatnonzero(expected != self.sequence_pointers)
            if bad.size:
                raise IndexedDatasetError(
                    f"{ipath}: pointer of sequence {bad[0]} is {self.sequence_pointers[bad[0]]}, "
                    f"expected {expected[bad[0]]} from the lengths before it"
                )
        # An empty .bin cannot be memory-mapped; there is nothing to read from it anyway.
        self._bin = (
            np.memmap(bpath, mode="r", dtype=np.uint8) if bin_size else np.empty(0, np.uint8)
        )

    def __getstate__(self) -> dict:
        # Memory maps do not pickle; a DataLoader worker reopens the files instead.
        return {"path_prefix": self.path_prefix, "verify_pointers": self._verify_pointers}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._verify_pointers = state["verify_pointers"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        """Number of documents (one fewer than the document-index entries)."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens in the `.bin`."""
        return self._bin.nbytes // np.dtype(self.dtype).itemsize

    def max_token_id(self, chunk_tokens: int = 1 << 26) -> int:
        """The largest token id in the `.bin` (-1 when empty): reads the whole file once, in
        chunks, so memory stays flat on any corpus size."""
        tokens = np.frombuffer(self._bin, self.dtype) if self._bin.nbytes else np.empty(0)
        largest = -1
        for start in range(0, len(tokens), chunk_tokens):
            largest = max(largest, int(tokens[start : start + chunk_tokens].max()))
        return largest

    def _read(self, byte_offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self._bin, self.dtype, count, byte_offset)

    @overload
    def __getitem__(self, idx: int | np.integer) -> np.ndarray: ...
    @overload
    def __getitem__(self, idx: slice) -> list[np.ndarray]: ...
    def __getitem__(self, idx: int | np.integer | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, (int, np.integer)):
            n = len(self)
            if not -n <= idx < n:
                raise IndexError(f"sequence {idx} out of range for {n} sequences")
            idx = int(idx) % n if n else idx
            return self._read(int(self.sequence_pointers[idx]), int(self.sequence_lengths[idx]))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(
                    f"slices of an indexed dataset must be contiguous, got step {step}"
                )
            if stop <= start:
                return []
            lengths = self.sequence_lengths[start:stop]
            flat = self._read(int(self.sequence_pointers[start]), int(lengths.sum(dtype=np.int64)))
            return np.split(flat, np.cumsum(lengths[:-1], dtype=np.int64))
        raise TypeError(f"index must be an int or a slice, got {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end if no length)."""
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {idx} "
                f"of {seq_len} tokens"
            )
        itemsize = np.dtype(self.dtype).itemsize
        return self._read(int(self.sequence_pointers[idx]) + offset * itemsize, length)

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences are contiguous in the `.bin`)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if first == last:
            return np.empty(0, self.dtype)
        count = int(self.sequence_lengths[first:last].sum(dtype=np.int64))
        return self._read(int(self.sequence_pointers[first]), count)

    @staticmethod
    def exists(path_prefix: str | os.PathLike) -> bool:
        """Whether both `{prefix}.idx` and `{prefix}.bin` exist."""
        return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))


class IndexedDatasetBuilder:
    """Writes a `.bin/.idx` pair, appending documents and whole datasets.

    Memory stays constant however large the dataset: tokens go straight to the `.bin`, and
    the sequence lengths and document ends are spilled to two side files in chunks, from
    which `finalize` streams the `.idx`. Everything is written under temporary names and
    renamed into place by `finalize`, so a reader (or a crash) never sees a half-written
    dataset.

    Args:
        bin_path: the `.bin` to produce (Megatron's builder takes the same argument).
        dtype: token dtype; `optimal_dtype(vocab_size)` picks Megatron's choice.
    """

    _SPILL_ENTRIES = 1 << 20  # buffered index entries before they go to the side files

    def __init__(self, bin_path: str | os.PathLike, dtype: type[np.number] = np.int32):
        self.bin_path = os.fspath(bin_path)
        self.dtype = np.dtype(dtype).type
        dtype_code(self.dtype)  # fail early on an unstorable dtype
        tmp = f"{self.bin_path}.tmp.{os.getpid()}"
        self._tmp_paths = [tmp, f"{tmp}.lengths", f"{tmp}.documents"]
        self._file = open(tmp, "wb")
        self._lengths_file = open(self._tmp_paths[1], "wb")  # int32 per sequence
        self._documents_file = open(self._tmp_paths[2], "wb")  # int64 end of each document
        self._lengths: list[int] = []
        self._document_ends: list[int] = []
        self._spilled_sequences = 0
        self._num_documents = 0

    def _sequence_count(self) -> int:
        return self._spilled_sequences + len(self._lengths)

    def _spill(self, lengths: np.ndarray | None = None, ends: np.ndarray | None = None) -> None:
        """Write the buffered entries, then `lengths`/`ends` if given, to the side files."""
        if self._lengths or self._document_ends:
            buffered = (np.asarray(self._lengths, np.int32), np.asarray(self._document_ends))
            self._lengths, self._document_ends = [], []
            self._spill(*buffered)
        if lengths is not None:
            self._lengths_file.write(np.asarray(lengths, np.int32).tobytes())
            self._spilled_sequences += len(lengths)
        if ends is not None:
            self._documents_file.write(np.asarray(ends, np.int64).tobytes())
            self._num_documents += len(ends)

    def _buffer(self, lengths: list[int], document_end: bool) -> None:
        self._lengths.extend(lengths)
        if document_end:
            self._document_ends.append(self._sequence_count())
        if len(self._lengths) + len(self._document_ends) >= self._SPILL_ENTRIES:
            self._spill()

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence (call `end_document` after the last sequence of a document)."""
        array = np.asarray(tokens, dtype=self.dtype)
        self._file.write(array.tobytes())
        self._buffer([array.size], document_end=False)

    def end_document(self) -> None:
        """Close the current document."""
        self._buffer([], document_end=True)

    def add_document(
        self, tokens: Sequence[int] | np.ndarray, lengths: Iterable[int] | None = None
    ) -> None:
        """Append one document: its tokens, split into sequences of `lengths` (default: one).

        As in Megatron, an empty document (no lengths) still gets its document-index entry.
        """
        array = np.asarray(tokens, dtype=self.dtype)
        lengths = [array.size] if lengths is None else [int(n) for n in lengths]
        if sum(lengths) != array.size:
            raise ValueError(f"sequence lengths {lengths} do not add up to {array.size} tokens")
        self._file.write(array.tobytes())
        self._buffer(lengths, document_end=True)

    def add_documents(
        self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray
    ) -> None:
        """Append many documents at once: their tokens back to back, split into sequences.

        Args:
            tokens: all tokens of all documents, `[sum(sequence_lengths)]`.
            sequence_lengths: tokens in each sequence, `[num_sequences]`.
            sequences_per_document: sequences in each document, `[num_documents]` (0 for an
                empty document, which still gets its document-index entry).
        """
        self._file.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self._spill()
        ends = self._sequence_count() + np.cumsum(sequences_per_document, dtype=np.int64)
        self._spill(sequence_lengths, ends)

    def add_index(self, path_prefix: str | os.PathLike) -> None:
        """Append every document of another dataset (same dtype) by copying its bytes."""
        other = IndexedDataset(path_prefix)
        if np.dtype(other.dtype) != np.dtype(self.dtype):
            raise IndexedDatasetError(
                f"{idx_path(path_prefix)}: dtype {np.dtype(other.dtype).name} does not match "
                f"the builder's {np.dtype(self.dtype).name}"
            )
        self._spill()
        offset = self._sequence_count()
        step = self._SPILL_ENTRIES
        for start in range(0, len(other), step):
            self._spill(other.sequence_lengths[start : start + step])
        ends = other.document_indices[1:]
        for start in range(0, len(ends), step):
            self._spill(ends=ends[start : start + step] + offset)
        with open(bin_path(path_prefix), "rb") as src:
            while chunk := src.read(64 << 20):
                self._file.write(chunk)

    def finalize(self, idx_path: str | os.PathLike) -> None:
        """Write the `.idx` and move both files into place (`.bin` first, `.idx` last)."""
        self._spill()
        for spill_file in (self._file, self._lengths_file, self._documents_file):
            spill_file.close()
        tmp_idx = f"{os.fspath(idx_path)}.tmp.{os.getpid()}"
        n_seq, n_doc = self._spilled_sequences, self._num_documents + 1
        itemsize = np.dtype(self.dtype).itemsize
        step = self._SPILL_ENTRIES
        with open(tmp_idx, "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<QBQQ", VERSION, dtype_code(self.dtype), n_seq, n_doc))
            with open(self._tmp_paths[1], "rb") as f:  # lengths, as they are
                while chunk := f.read(4 * step):
                    out.write(chunk)
            pointer = 0  # byte offsets: a running sum over the lengths, chunk by chunk
            with open(self._tmp_paths[1], "rb") as f:
                while chunk := f.read(4 * step):
                    sizes = np.frombuffer(chunk, np.int32).astype(np.int64) * itemsize
                    ends = np.cumsum(sizes) + pointer
                    out.write((ends - sizes).tobytes())
                    pointer = int(ends[-1])
            out.write(np.zeros(1, np.int64).tobytes())
            with open(self._tmp_paths[2], "rb") as f:
                while chunk := f.read(8 * step):
                    out.write(chunk)
        os.replace(self._tmp_paths[0], self.bin_path)
        os.replace(tmp_idx, idx_path)
        for path in self._tmp_paths[1:]:
            os.remove(path)

    def abort(self) -> None:
        """Drop everything written so far (no output files appear)."""
        for f in (self._file, self._lengths_file, self._documents_file):
            f.close()
        for path in self._tmp_paths:
            Path(path).unlink(missing_ok=True)
