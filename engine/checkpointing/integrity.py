"""Checkpoints that cannot rot silently: a checksum of every file, and no non-finite state.

**Checksums.** Every file a save writes (model and optimizer shards, RNG files) is hashed as
its bytes are written (`HashingFile`, no read-back), and rank 0 records every rank's
checksums in ``metadata.json``::

    "checksums": {"algorithm": "crc32", "chunk_bytes": 16777216,
                  "files": {"model_tp00_pp00.safetensors":
                                {"size_bytes": 1234, "crc32": [3735928559, ...]}, ...}}

one CRC-32 per 16 MiB chunk, so that a large file is verified by several threads at once
(`zlib.crc32` releases the GIL). CRC-32 because it is the fastest hash in the standard library
(about 2 GB/s a core here, against 1.0 for SHA-256 and 0.8 for BLAKE2b; see
benchmarks/checkpoint_io.py) and detects what rots files (flipped bits, bursts, truncation);
it is no defence against deliberate tampering, which is not what it is for. At load every
file a rank reads is verified before any of its bytes are used (`verify_files`); a missing
file, a size or a checksum that differs is a `CheckpointError` naming the file and what
differed. Checkpoints saved before checksums existed (or converted ones) load with a warning.

**Finite state.** A save refuses to publish weights or optimizer state that hold a NaN or an
infinity (`first_non_finite`): the caller gets `NonFiniteStateError`, and the previous
checkpoint stays the latest.
"""

from __future__ import annotations

import io
import logging
import os
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from engine.checkpointing.storage import CheckpointError

logger = logging.getLogger(__name__)

ALGORITHM = "crc32"
CHUNK_BYTES = 16 << 20
"""Bytes per checksum: small enough for threads to share a file, large enough that the list
stays short (64 entries a GB)."""
_MAX_THREADS = 8


class NonFiniteStateError(CheckpointError):
    """A save found a NaN or an infinity in the weights or optimizer state and published
    nothing; the previous checkpoint is still the latest."""


# Hashing what is written ---------------------------------------------------------------------


class ChunkedChecksum:
    """The CRC-32 of every `CHUNK_BYTES` chunk of a byte stream, fed in pieces of any size."""

    def __init__(self) -> None:
        self.size_bytes = 0
        self._crcs: list[int] = []
        self._crc = 0
        self._filled = 0  # bytes of the current chunk

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), CHUNK_BYTES - self._filled)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            self.size_bytes += take
            view = view[take:]
            if self._filled == CHUNK_BYTES:
                self._crcs.append(self._crc)
                self._crc, self._filled = 0, 0

    def record(self) -> dict[str, Any]:
        """``{"size_bytes": n, "crc32": [one per chunk]}`` as ``metadata.json`` stores it."""
        crcs = self._crcs + ([self._crc] if self._filled else [])
        return {"size_bytes": self.size_bytes, ALGORITHM: crcs}


class HashingFile:
    """A binary file opened for writing that hashes every byte written to it."""

    def __init__(self, path: Path):
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by `close`
        self.checksum = ChunkedChecksum()

    def write(self, data: Any) -> int:
        self.checksum.update(data)
        return self._file.write(data)

    def close(self) -> None:
        """Flush and fsync (a checkpoint file must be durable before it is published)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def write_hashed(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` (fsynced); return its checksum record."""
    out = HashingFile(path)
    try:
        out.write(data)
    finally:
        out.close()
    return out.checksum.record()


def save_pickle_hashed(path: Path, obj: Any) -> dict[str, Any]:
    """``torch.save`` into ``path`` (fsynced); return its checksum record."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_hashed(path, buffer.getvalue())


def checksum_file(path: Path) -> dict[str, Any]:
    """The checksum record of a file on disk (streamed)."""
    checksum = ChunkedChecksum()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            checksum.update(chunk)
    return checksum.record()


def checksums_record(files: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``checksums`` entry of ``metadata.json`` for ``{file name: checksum record}``."""
    files = dict(sorted(files.items()))
    return {"algorithm": ALGORITHM, "chunk_bytes": CHUNK_BYTES, "files": files}


# Verifying what is read ----------------------------------------------------------------------

_warned_unverified: set[str] = set()


def verify_files(
    directory: Path, names: Iterable[str], metadata: Mapping[str, Any], warn: bool = True
) -> None:
    """Check that the files ``names`` of checkpoint ``directory`` are exactly what its save
    wrote (size and every chunk's checksum); raise `CheckpointError` naming the first file
    that differs and how. Chunks are hashed by a few threads in parallel. A checkpoint whose
    metadata records no checksums is accepted with a warning (once per directory)."""
    record = metadata.get("checksums")
    if record is None:
        if warn and str(directory) not in _warned_unverified:
            _warned_unverified.add(str(directory))
            logger.warning(
                "%s records no checksums (saved by an older engine, or converted): its files "
                "are loaded unverified", directory / "metadata.json",
            )  # fmt: skip
        return
    if record.get("algorithm") != ALGORITHM:
        raise CheckpointError(
            f"{directory / 'metadata.json'} records checksums of algorithm "
            f"{record.get('algorithm')!r}; this engine verifies {ALGORITHM!r}"
        )
    chunk_bytes, expected = int(record["chunk_bytes"]), record["files"]
    jobs: list[tuple[Path, int, int]] = []  # (path, chunk number, crc expected)
    for name in sorted(set(names)):
        path = directory / name
        if name not in expected:
            raise CheckpointError(f"{path}: no checksum in {directory / 'metadata.json'}")
        if not path.exists():
            raise CheckpointError(f"{path} is missing (listed in {directory / 'metadata.json'})")
        size = path.stat().st_size
        if size != expected[name]["size_bytes"]:
            raise CheckpointError(
                f"{path} is corrupt: {size} bytes on disk, {expected[name]['size_bytes']} "
                "when it was saved (truncated or overwritten)"
            )
        jobs += [(path, i, crc) for i, crc in enumerate(expected[name][ALGORITHM])]
    if not jobs:
        return
    threads = max(1, min(_MAX_THREADS, len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="checkpoint-verify") as pool:
        found = list(pool.map(lambda job: _chunk_crc(job[0], job[1], chunk_bytes), jobs))
    for (path, chunk, crc), actual in zip(jobs, found, strict=True):
        if actual != crc:
            start = chunk * chunk_bytes
            raise CheckpointError(
                f"{path} is corrupt: {ALGORITHM} of bytes [{start}, {start + chunk_bytes}) is "
                f"{actual:#010x}, {crc:#010x} when it was saved"
            )


def _chunk_crc(path: Path, chunk: int, chunk_bytes: int) -> int:
    with open(path, "rb") as f:
        f.seek(chunk * chunk_bytes)
        return zlib.crc32(f.read(chunk_bytes))


# Finite state --------------------------------------------------------------------------------


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The key of the first floating-point tensor holding a NaN or an infinity, or None."""
    for key, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None
