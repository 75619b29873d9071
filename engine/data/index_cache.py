"""Build index arrays once, save them as `.npy`, memory-map them everywhere else.

Datasets describe everything that affects their indices (files, split, sample count, seed,
sequence length, ...) as a JSON-able dict; its hash names the cache files, so a changed
setting can never load a stale index. Writers are safe against each other in two ways:

- Under `torch.distributed`, global rank 0 builds (or finds) the cache first while the other
  ranks wait at a barrier, then they memory-map it: one build per job.
- Across unrelated processes (two jobs, or ranks without a process group), an exclusive
  `flock` on `{base}.lock` lets one build while the others wait, and each file is written
  under a temporary name and renamed, with the description written last as the "complete"
  marker, so a reader never sees a partial file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np


def description_hash(description: dict) -> str:
    """MD5 of the canonical JSON of `description` (names the cache files)."""
    text = json.dumps(description, sort_keys=True)
    return hashlib.md5(text.encode("utf-8")).hexdigest()


@contextmanager
def _exclusive(lock_path: str):
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class IndexCache:
    """The cache files of one set of arrays: `{cache_dir}/{hash}-{kind}-{name}.npy`.

    Args:
        cache_dir: where the files live (created when needed); None keeps everything in memory.
        kind: a readable tag in the file names, e.g. "GPTDataset-train".
        description: everything that affects the arrays (JSON-able).
    """

    def __init__(self, cache_dir: str | os.PathLike | None, kind: str, description: dict):
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.description = json.dumps(description, sort_keys=True, indent=1)
        self.base = f"{description_hash(description)}-{kind}"

    def path(self, name: str) -> str:
        """Path of one cache file (`name` is e.g. "sample_index.npy")."""
        assert self.cache_dir is not None
        return os.path.join(self.cache_dir, f"{self.base}-{name}")

    def is_complete(self, names: list[str]) -> bool:
        """Whether every array and the description (written last) exist and match."""
        if self.cache_dir is None:
            return False
        description = self.path("description.json")
        if not os.path.isfile(description):
            return False
        with open(description, encoding="utf-8") as f:
            if f.read() != self.description:  # a hash collision must not load wrong indices
                return False
        return all(os.path.isfile(self.path(f"{name}.npy")) for name in names)

    def load(self, names: list[str]) -> dict[str, np.ndarray]:
        """Memory-map the arrays (read-only)."""
        return {name: np.load(self.path(f"{name}.npy"), mmap_mode="r") for name in names}

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        """Write every array, then the description, each under a temporary name first."""
        assert self.cache_dir is not None
        os.makedirs(self.cache_dir, exist_ok=True)
        for name, array in arrays.items():
            final = self.path(f"{name}.npy")
            tmp = f"{final}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, final)
        final = self.path("description.json")
        tmp = f"{final}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.description)
        os.replace(tmp, final)

    def build_or_load(
        self,
        names: list[str],
        build: Callable[[], dict[str, np.ndarray]],
        distributed: bool = True,
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The arrays, from the cache or from `build()`; also whether this process built them.

        Args:
            names: the arrays `build` returns.
            build: computes the arrays (called at most once per cache across the job).
            distributed: when a process group is up, rank 0 goes first and the others wait at a
                barrier (a collective: every rank must call). False relies on the file lock.
        """
        if self.cache_dir is None:
            return build(), True
        if distributed and _world_size() > 1:
            import torch.distributed as dist

            result = self._locked_build_or_load(names, build) if dist.get_rank() == 0 else None
            dist.barrier()
            if result is None:
                result = self._locked_build_or_load(names, build)
            return result
        return self._locked_build_or_load(names, build)

    def _locked_build_or_load(self, names, build) -> tuple[dict[str, np.ndarray], bool]:
        if self.is_complete(names):
            return self.load(names), False
        assert self.cache_dir is not None  # `build_or_load` builds in memory without one
        os.makedirs(self.cache_dir, exist_ok=True)
        with _exclusive(self.path("lock")):
            if self.is_complete(names):  # another process finished while we waited
                return self.load(names), False
            arrays = build()
            self.save(arrays)
        return arrays, True


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
