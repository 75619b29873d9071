"""Pure-NumPy statements of the index builders in csrc/helpers.cpp (`engine.data.helpers`).

These define what the C++ computes, in vectorised or plainly looped form; the tests check
that both agree. The datasets use the C++ versions (the greedy blending loop is sequential
and slow in Python).
"""

from __future__ import annotations

import numpy as np


def build_sample_idx(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> np.ndarray:
    """Where each fixed-length sample starts in the document stream.

    The documents `sizes[document_index]` are laid end to end. Sample i takes stream tokens
    `[i * seq_length, (i + 1) * seq_length + extra)` (extra = 1 for the shifted labels). Row i
    of the result is (position in `document_index`, token offset) of stream token
    `i * seq_length`, located in the first document whose end reaches past the previous
    sample's last token; a boundary on a document end therefore stays on the earlier document.

    Returns:
        `[num_samples + 1, 2]` int64.
    """
    extra = 1 if add_extra_token_to_sequence else 0
    usable = num_epochs * tokens_per_epoch - extra
    num_samples = usable // seq_length if drop_last_partial_sequence else -(-usable // seq_length)
    lengths = np.asarray(sizes, np.int64)[np.asarray(document_index)]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    entries = np.searchsorted(ends, positions + extra, side="left")
    ran_out = entries >= len(lengths)  # only the last partial sample can
    entries = np.minimum(entries, len(lengths) - 1)
    # Clamped at 0 should the last document be empty.
    offsets = np.where(ran_out, max(lengths[-1] - extra, 0), positions - starts[entries])
    result = np.zeros((num_samples + 1, 2), np.int64)
    result[1:, 0] = entries
    result[1:, 1] = offsets
    return result


def _greedy(weights: np.ndarray, size: int, caps: np.ndarray | None):
    """Sample i goes to the dataset lagging its target `weights[d] * max(i, 1)` most (first
    on ties), skipping datasets that reached `caps`."""
    counts = np.zeros(len(weights), np.int64)
    which = np.zeros(size, np.int16)
    nth = np.zeros(size, np.int64)
    for i in range(size):
        lag = weights * max(i, 1) - counts
        if caps is not None:
            lag = np.where(counts < caps, lag, -np.inf)
        d = int(np.argmax(lag))  # argmax keeps the first maximum
        which[i], nth[i] = d, counts[d]
        counts[d] += 1
    return which, nth


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blending of `size` samples by weight.

    Returns (dataset_index int16[size], dataset_sample_index int64[size]).
    """
    return _greedy(np.asarray(weights, np.float64), size, None)


def build_exhaustive_blending_indices(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blending that uses exactly `sizes[d]` samples of each dataset d.

    The same greedy rule with weights `sizes / sum(sizes)`, over the datasets not yet used up.
    """
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    return _greedy(sizes / total, total, sizes)
