"""The `.bin/.idx` reader and builder: round trips, random access, merging, atomic writes,
corrupt files, and byte compatibility with Megatron-Core's own implementation."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from engine.data.indexed_dataset import (
    HEADER_BYTES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    optimal_dtype,
)


def random_documents(rng: np.random.Generator, n: int, high: int) -> list[list[np.ndarray]]:
    """`n` documents of 0-3 sequences each (0 makes an empty document, as Megatron allows)."""
    docs = []
    for _ in range(n):
        docs.append([rng.integers(0, high, rng.integers(0, 40)) for _ in range(rng.integers(0, 4))])
    return docs


def write(prefix, docs, dtype) -> None:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for sequences in docs:
        tokens = np.concatenate(sequences) if sequences else np.zeros(0, np.int64)
        builder.add_document(tokens, [len(s) for s in sequences])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8, np.float32])
def test_round_trip_and_random_access(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 200, 120)
    write(tmp_path / "ds", docs, dtype)
    ds = IndexedDataset(tmp_path / "ds", verify_pointers=True)
    sequences = [s for d in docs for s in d]
    assert ds.dtype == dtype and len(ds) == len(sequences) and ds.num_documents == len(docs)
    assert ds.num_tokens == sum(len(s) for s in sequences)
    for i in rng.permutation(len(sequences)):
        np.testing.assert_array_equal(ds[int(i)], sequences[i])
    np.testing.assert_array_equal(ds[-1], sequences[-1])
    for start, stop in [(0, len(ds)), (5, 17), (30, 31), (10, 10)]:
        got = ds[start:stop]
        assert len(got) == stop - start
        for a, b in zip(got, sequences[start:stop], strict=True):
            np.testing.assert_array_equal(a, b)
    long = int(np.argmax(ds.sequence_lengths))
    np.testing.assert_array_equal(ds.get(long, 3, 5), sequences[long][3:8])
    np.testing.assert_array_equal(ds.get(long, 4), sequences[long][4:])
    for d, sequences_of_doc in enumerate(docs):
        want = np.concatenate(sequences_of_doc) if sequences_of_doc else np.zeros(0)
        np.testing.assert_array_equal(ds.document(d), want)
    # Reads are views of the memory map, not copies.
    assert not ds[0].flags.owndata and not ds[0].flags.writeable


def test_bad_access_raises(tmp_path):
    write(tmp_path / "ds", [[np.arange(5)]], np.uint16)
    ds = IndexedDataset(tmp_path / "ds")
    with pytest.raises(IndexError, match="out of range"):
        ds[1]
    with pytest.raises(IndexError, match="out of range"):
        ds.get(0, 3, 5)
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:1:2]


def test_pickle_reopens_the_files(tmp_path):
    write(tmp_path / "ds", [[np.arange(7)], [np.arange(3)]], np.int32)
    copy = pickle.loads(pickle.dumps(IndexedDataset(tmp_path / "ds")))
    np.testing.assert_array_equal(copy[1], [0, 1, 2])


def test_add_index_equals_writing_everything_at_once(tmp_path):
    rng = np.random.default_rng(1)
    parts = [random_documents(rng, n, 1000) for n in (30, 0, 17)]
    for i, docs in enumerate(parts):
        write(tmp_path / f"part{i}", docs, np.uint16)
    builder = IndexedDatasetBuilder(f"{tmp_path}/merged.bin", np.uint16)
    builder.add_document([7, 7, 7])
    for i in range(len(parts)):
        builder.add_index(tmp_path / f"part{i}")
    builder.add_document([9])
    builder.finalize(f"{tmp_path}/merged.idx")
    write(tmp_path / "whole", [[np.array([7, 7, 7])], *sum(parts, []), [np.array([9])]], np.uint16)
    for suffix in (".bin", ".idx"):
        merged = (tmp_path / f"merged{suffix}").read_bytes()
        assert merged == (tmp_path / f"whole{suffix}").read_bytes()


def test_add_index_rejects_another_dtype(tmp_path):
    write(tmp_path / "a", [[np.arange(3)]], np.int32)
    builder = IndexedDatasetBuilder(f"{tmp_path}/b.bin", np.uint16)
    with pytest.raises(IndexedDatasetError, match="int32 does not match the builder's uint16"):
        builder.add_index(tmp_path / "a")
    builder.abort()


def test_finalize_is_atomic(tmp_path):
    builder = IndexedDatasetBuilder(f"{tmp_path}/ds.bin", np.uint16)
    builder.add_document(np.arange(10))
    # Until finalize, nothing under the final names exists for a reader to see half-written.
    assert not (tmp_path / "ds.bin").exists() and not (tmp_path / "ds.idx").exists()
    builder.finalize(f"{tmp_path}/ds.idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]
    aborted = IndexedDatasetBuilder(f"{tmp_path}/gone.bin", np.uint16)
    aborted.add_document([1, 2])
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_optimal_dtype_matches_megatrons_threshold():
    assert optimal_dtype(32000) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128256) == np.int32
    assert optimal_dtype(None) == np.int32


def _corrupt(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "bad magic": (lambda p: _corrupt(p.with_suffix(".idx"), 0, b"XXIDIDX"), "bad magic", ".idx"),
    "version": (
        lambda p: _corrupt(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)),
        "unsupported version 2",
        ".idx",
    ),
    "dtype code": (
        lambda p: _corrupt(p.with_suffix(".idx"), 17, b"\x09"),
        "unknown dtype code 9",
        ".idx",
    ),
    "short header": (
        lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:20]),
        "shorter than the 34-byte header",
        ".idx",
    ),
    "truncated index": (
        lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-8]),
        "truncated or corrupt",
        ".idx",
    ),
    "truncated bin": (
        lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]),
        "truncated or mismatched",
        ".bin",
    ),
    "document index": (
        lambda p: _corrupt(
            p.with_suffix(".idx"), p.with_suffix(".idx").stat().st_size - 8, struct.pack("<q", 99)
        ),
        "document index must run from 0 to 3",
        ".idx",
    ),
    "missing bin": (lambda p: p.with_suffix(".bin").unlink(), "missing", ".bin"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_files_raise_naming_file_and_problem(tmp_path, case):
    prefix = tmp_path / "ds"
    write(prefix, [[np.arange(4)], [np.arange(5), np.arange(2)]], np.uint16)
    damage, message, named = CORRUPTIONS[case]
    damage(prefix)
    with pytest.raises(IndexedDatasetError, match=message) as error:
        IndexedDataset(prefix)
    assert f"{prefix}{named}" in str(error.value)


def test_wrong_pointer_found_when_verifying(tmp_path):
    prefix = tmp_path / "ds"
    write(prefix, [[np.arange(4)], [np.arange(5)], [np.arange(2)]], np.uint16)
    _corrupt(prefix.with_suffix(".idx"), HEADER_BYTES + 3 * 4 + 8, struct.pack("<q", 2))
    with pytest.raises(IndexedDatasetError, match="pointer of sequence 1 is 2, expected 8"):
        IndexedDataset(prefix, verify_pointers=True)


def test_megatron_core_reads_ours_and_we_read_theirs(tmp_path):
    # Not skipped when missing: compatibility is a promise; `pip install -e ".[test]"` has it.
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MegatronBuilder

    rng = np.random.default_rng(2)
    docs = random_documents(rng, 100, 70000)
    write(tmp_path / "ours", docs, np.int32)
    theirs = MegatronDataset(str(tmp_path / "ours"))
    ours = IndexedDataset(tmp_path / "ours")
    np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
    for i in range(len(ours)):
        np.testing.assert_array_equal(theirs[i], ours[i])

    builder = MegatronBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    for sequences in docs:
        tokens = np.concatenate(sequences) if sequences else np.zeros(0, np.int32)
        builder.add_document(tokens, [len(s) for s in sequences])
    builder.finalize(str(tmp_path / "theirs.idx"))
    read_back = IndexedDataset(tmp_path / "theirs", verify_pointers=True)
    np.testing.assert_array_equal(read_back.document_indices, ours.document_indices)
    for i in range(len(ours)):
        np.testing.assert_array_equal(read_back[i], ours[i])
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"theirs{suffix}").read_bytes() == (
            tmp_path / f"ours{suffix}"
        ).read_bytes()


def test_spilling_the_index_in_small_chunks_changes_nothing(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    docs = random_documents(rng, 150, 500)
    write(tmp_path / "part", docs[:40], np.uint16)
    write(tmp_path / "whole", docs + docs[:40], np.uint16)
    # Spill every few entries, across add_document, add_documents and add_index.
    monkeypatch.setattr(IndexedDatasetBuilder, "_SPILL_ENTRIES", 7)
    builder = IndexedDatasetBuilder(f"{tmp_path}/small.bin", np.uint16)
    for sequences in docs[:100]:
        tokens = np.concatenate(sequences) if sequences else np.zeros(0, np.int64)
        builder.add_document(tokens, [len(s) for s in sequences])
    rest = docs[100:]
    flat = [s for d in rest for s in d]
    builder.add_documents(
        np.concatenate(flat), np.array([len(s) for s in flat]), np.array([len(d) for d in rest])
    )
    builder.add_index(tmp_path / "part")
    builder.finalize(f"{tmp_path}/small.idx")
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"small{suffix}").read_bytes() == (
            tmp_path / f"whole{suffix}"
        ).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if "small" in p.name) == [
        "small.bin",
        "small.idx",
    ]
