"""The C++ index builders (`engine.data.helpers`) against their NumPy statements and against
Megatron-Core's own C++ helpers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.data import helpers
from engine.data import helpers_reference as reference


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 50, rng.integers(1, 60)).astype(np.int32)
    sizes[0] = max(sizes[0], 1)
    epochs = int(rng.integers(1, 4))
    document_index = np.concatenate([rng.permutation(len(sizes)) for _ in range(epochs)])
    seq_length = int(rng.integers(2, 40))  # Megatron-Core asserts > 1
    return sizes, document_index.astype(np.int32), seq_length, epochs, int(sizes.sum())


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [True, False])
def test_sample_idx_matches_numpy_and_megatron(seed, drop_last, extra):
    from megatron.core.datasets import helpers as megatron_helpers

    sizes, document_index, seq_length, epochs, tokens = random_case(seed)
    args = (sizes, document_index, seq_length, epochs, tokens, drop_last, extra)
    ours = helpers.build_sample_idx(*args)
    np.testing.assert_array_equal(ours, reference.build_sample_idx(*args))
    # Megatron-Core's raw int32 builder (its wrapper asserts on the -1 it writes for a partial
    # last sample ending in an empty document, where ours writes 0).
    theirs = megatron_helpers.build_sample_idx_int32(*args[:-1], int(extra))
    np.testing.assert_array_equal(ours, np.maximum(theirs, 0))
    assert ours.dtype == np.int32
    # int64 document indices give the same rows.
    np.testing.assert_array_equal(
        helpers.build_sample_idx(sizes, document_index.astype(np.int64), *args[2:]), ours
    )


def test_samples_tile_the_token_stream():
    """Reassembling samples from the index gives consecutive windows of the stream."""
    sizes, document_index, seq_length, epochs, tokens = random_case(7)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, s) for s in sizes]
    stream = np.concatenate([docs[d] for d in document_index])
    index = helpers.build_sample_idx(sizes, document_index, seq_length, epochs, tokens)
    for i in range(len(index) - 1):
        (e0, o0), (e1, o1) = index[i], index[i + 1]
        if e0 == e1:
            sample = docs[document_index[e0]][o0 : o1 + 1]
        else:
            pieces = [docs[document_index[e0]][o0:]]
            pieces += [docs[document_index[e]] for e in range(e0 + 1, e1)]
            pieces.append(docs[document_index[e1]][: o1 + 1])
            sample = np.concatenate(pieces)
        np.testing.assert_array_equal(sample, stream[i * seq_length : (i + 1) * seq_length + 1])


@pytest.mark.parametrize("seed", range(10))
def test_blending_matches_numpy_and_megatron(seed):
    from megatron.core.datasets import helpers as megatron_helpers

    rng = np.random.default_rng(seed)
    weights = rng.random(int(rng.integers(1, 6)))
    weights /= weights.sum()
    size = int(rng.integers(1, 500))
    which, nth = helpers.build_blending_indices(weights, size)
    ref_which, ref_nth = reference.build_blending_indices(weights, size)
    np.testing.assert_array_equal(which, ref_which)
    np.testing.assert_array_equal(nth, ref_nth)
    mc_which, mc_nth = np.zeros(size, np.int16), np.zeros(size, np.int64)
    megatron_helpers.build_blending_indices(mc_which, mc_nth, weights, len(weights), size, False)
    np.testing.assert_array_equal(which, mc_which)
    np.testing.assert_array_equal(nth, mc_nth)
    # Each dataset's samples are numbered 0, 1, 2, ... in order, and the mix follows the weights.
    for d in range(len(weights)):
        np.testing.assert_array_equal(nth[which == d], np.arange((which == d).sum()))
        assert abs((which == d).sum() - weights[d] * size) <= 1 + 0.01 * size


@pytest.mark.parametrize("seed", range(10))
def test_exhaustive_blending_matches_numpy_and_megatron(seed):
    from megatron.core.datasets import helpers as megatron_helpers

    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 80, int(rng.integers(1, 6))).astype(np.int64)
    sizes[0] += 1
    which, nth = helpers.build_exhaustive_blending_indices(sizes)
    ref_which, ref_nth = reference.build_exhaustive_blending_indices(sizes)
    np.testing.assert_array_equal(which, ref_which)
    np.testing.assert_array_equal(nth, ref_nth)
    total = int(sizes.sum())
    mc_which, mc_nth = np.zeros(total, np.int16), np.zeros(total, np.int64)
    megatron_helpers.build_exhaustive_blending_indices(mc_which, mc_nth, sizes, len(sizes))
    np.testing.assert_array_equal(which, mc_which)
    np.testing.assert_array_equal(nth, mc_nth)
    np.testing.assert_array_equal(np.bincount(which, minlength=len(sizes)), sizes)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="seq_length must be at least 1"):
        helpers.build_sample_idx(np.ones(3, np.int32), np.arange(3, dtype=np.int32), 0, 1, 3)
    with pytest.raises(IndexError, match="outside sizes"):
        helpers.build_sample_idx(np.ones(3, np.int32), np.array([0, 5, 1], np.int32), 1, 1, 3)
    with pytest.raises(ValueError, match="between 1 and 32767 datasets"):
        helpers.build_blending_indices(np.zeros(0), 4)


def test_the_gil_is_released():
    """A Python thread keeps ticking while the C++ builds a large index (~0.1 s).

    With the GIL held for the whole call, the ticker could not run at all inside it.
    """
    sizes = np.full(200_000, 500, np.int32)
    document_index = np.arange(len(sizes), dtype=np.int32)
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.01)  # let the ticker start
    start = time.perf_counter()
    helpers.build_sample_idx(sizes, document_index, 8, 1, int(sizes.sum()))
    end = time.perf_counter()
    done.set()
    thread.join()
    during = [t for t in ticks if start < t < end]
    assert len(during) >= 5, (len(during), end - start)
