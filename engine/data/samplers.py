"""Data-parallel batch samplers that resume exactly from `consumed_samples`.

Training consumes a global batch of `micro_batch_size * data_parallel_size` samples per
micro-step; each DP rank takes its own `micro_batch_size` slice. A checkpoint records only
`consumed_samples` (a global count), and a sampler started from it yields exactly the batches
the uninterrupted run would have yielded next, on every rank and for any DP size that divides
the same global order.

- `PretrainingSampler`: samples in index order (GPT/blended datasets are shuffled already).
- `RandomSampler`: per-epoch shuffles seeded by `seed + epoch`, for datasets that are not
  (e.g. SFT); each rank draws from its own contiguous bucket, as Megatron's random sampler.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sized
from typing import cast

import numpy as np
import torch


def dataset_length(dataset: torch.utils.data.Dataset) -> int:
    """``len(dataset)``: torch's `Dataset` type does not declare ``__len__``, but every
    map-style dataset here defines it (GPT, blended, SFT datasets, `Subset` s of them)."""
    return len(cast(Sized, dataset))


class _DataParallelSampler(torch.utils.data.Sampler):
    """What both samplers share: the DP layout, checked, and the global batch it implies."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} and data_parallel_size="
                f"{data_parallel_size} must be > 0"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} is outside [0, {data_parallel_size})"
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} must not be negative")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.global_batch = micro_batch_size * data_parallel_size


class PretrainingSampler(_DataParallelSampler):
    """Sequential global order from `consumed_samples` on; yields this rank's micro-batches.

    Args:
        total_samples: samples in the dataset.
        consumed_samples: samples (over all DP ranks) consumed before this run.
        micro_batch_size: samples per rank per micro-step.
        data_parallel_rank, data_parallel_size: this rank's place in the DP group.
        drop_last: drop a final incomplete global batch (else each rank gets its share of it).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        super().__init__(
            total_samples,
            consumed_samples,
            micro_batch_size,
            data_parallel_rank,
            data_parallel_size,
        )
        if consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not below total_samples={total_samples}: "
                "the run has used the whole dataset (ask for more --train-samples)"
            )
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, partial = divmod(remaining, self.global_batch)
        return full + (0 if self.drop_last or partial == 0 else 1)

    def __iter__(self) -> Iterator[list[int]]:
        mine = slice(self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size)
        start = self.consumed_samples
        while start + self.global_batch <= self.total_samples:
            yield list(range(start, start + self.global_batch))[mine]
            start += self.global_batch
        if start < self.total_samples and not self.drop_last:
            # Split the remainder evenly so every rank still takes a step.
            rest = np.array_split(
                np.arange(start, self.total_samples), self.global_batch // self.micro_batch_size
            )
            yield rest[self.rank].tolist()


class RandomSampler(_DataParallelSampler):
    """Epochs of seeded shuffles; resumes mid-epoch from `consumed_samples`.

    Each epoch uses `total_samples` rounded down to whole global batches. Rank r owns the
    contiguous bucket `[r * bucket, (r + 1) * bucket)` and walks a permutation of it seeded by
    `seed + epoch`; after `k` global batches every rank has taken `k * micro_batch_size` of
    its bucket, so the offset into the permutation follows from `consumed_samples` alone.
    Iterates forever (epoch after epoch); the training loop decides when to stop.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        seed: int = 0,
    ):
        super().__init__(
            total_samples,
            consumed_samples,
            micro_batch_size,
            data_parallel_rank,
            data_parallel_size,
        )
        self.seed = seed
        self.bucket = (total_samples // self.global_batch) * micro_batch_size
        if self.bucket == 0:
            raise ValueError(
                f"total_samples={total_samples} is smaller than one global batch "
                f"({micro_batch_size} x {data_parallel_size})"
            )
        self.epoch_samples = self.bucket * data_parallel_size

    def __iter__(self) -> Iterator[list[int]]:
        epoch, in_epoch = divmod(self.consumed_samples, self.epoch_samples)
        if in_epoch % self.global_batch:
            raise ValueError(
                f"consumed_samples={self.consumed_samples} is not a whole number of global "
                f"batches ({self.global_batch}); was the DP size or micro-batch size changed?"
            )
        offset = in_epoch // self.data_parallel_size
        while True:
            order = np.random.RandomState(self.seed + epoch).permutation(self.bucket)
            order = order + self.rank * self.bucket
            for start in range(offset, self.bucket, self.micro_batch_size):
                yield order[start : start + self.micro_batch_size].tolist()
            epoch, offset = epoch + 1, 0


def build_data_loader(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader of this rank's micro-batches, resuming after `consumed_samples`.

    `shuffle=False` walks the dataset in order (GPT/blended datasets are pre-shuffled);
    `shuffle=True` uses `RandomSampler` with `seed`, epoch after epoch.
    """
    layout = (
        dataset_length(dataset),
        consumed_samples,
        micro_batch_size,
        data_parallel_rank,
        data_parallel_size,
    )
    sampler = RandomSampler(*layout, seed=seed) if shuffle else PretrainingSampler(*layout)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_termination if num_workers > 0 else None,
    )


def ignore_termination(worker_id: int) -> None:
    """A DataLoader worker's start: ignore SIGTERM.

    A pre-emption notice reaches every process of a job at once (SLURM signals them all,
    torchrun signals each rank's process group, workers included). A worker that died of it
    would take its rank down with "DataLoader worker is killed by signal" before the rank
    could save at the next iteration; ignoring it, the worker leaves when its rank shuts the
    loader down, or within seconds of its rank dying (the loader's watchdog of its parent).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
