"""Every random stream of a rank (torch generators and the TP RNG tracker, Python's, NumPy's)
as a small pickled file.

Pickles are always loaded with ``weights_only=True``: only tensors and plain containers are
accepted; a file that would run code when unpickled is refused (`CheckpointError`, from the
``UnpicklingError``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from engine.checkpointing.integrity import save_pickle_hashed
from engine.checkpointing.storage import CheckpointError
from engine.tensor_parallel.random import get_rng_states, set_rng_states


def save_pickle(path: Path, obj: Any) -> dict[str, Any]:
    """torch.save + fsync, for small non-tensor state (RNG states); returns the file's
    checksum record."""
    return save_pickle_hashed(path, obj)


def load_pickle(path: Path) -> Any:
    """torch.load with ``weights_only=True``, always: only tensors and plain containers are
    accepted; a pickle that would construct other objects (and so run code) is refused.

    Raises:
        CheckpointError: naming ``path``, from whatever ``torch.load`` raised (a refused or
            truncated pickle, a file that is no pickle).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure, named and chained
        raise CheckpointError(f"{path} cannot be loaded: {error}") from error


def rng_state() -> dict[str, Any]:
    """Every random stream of this rank, as tensors and plain values (``weights_only``)."""
    name, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))
    return {
        "torch": get_rng_states(),
        "python": random.getstate(),
        "numpy": {
            "name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    set_rng_states(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((
        numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
        numpy["has_gauss"], numpy["cached_gaussian"],
    ))  # fmt: skip
