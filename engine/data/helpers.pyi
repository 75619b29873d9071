# Types of the compiled index builders (csrc/helpers.cpp, a pybind11 module that mypy cannot
# read); engine/data/helpers_reference.py is their NumPy reference, with the same signatures.
import numpy as np

def build_sample_idx(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> np.ndarray: ...
def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]: ...
def build_exhaustive_blending_indices(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
