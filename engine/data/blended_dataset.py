"""Blends of datasets by weight (`--data-path 0.7 web 0.3 code`), as Megatron-Core's.

Sample i of the blend is sample `dataset_sample_index[i]` of dataset `dataset_index[i]`. The
two arrays come from the greedy rule in `engine.data.helpers.build_blending_indices` (each
sample goes to the dataset furthest behind its share), so any prefix of the blend follows the
weights closely, not just the whole. Without weights, the exhaustive variant takes every
sample of every dataset once. The arrays are cached like the GPT indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engine.data.gpt_dataset import (
    SPLIT_NAMES,
    GPTDatasetConfig,
    build_gpt_datasets,
    cache_dir,
)
from engine.data.index_cache import IndexCache
from engine.data.samplers import dataset_length

# Megatron's default --mid-level-dataset-surplus: each component gets 0.5% more samples than
# its share so rounding in the greedy blend never asks for one past its end.
SURPLUS = 0.005


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """`["0.7", "a", "0.3", "b"]` -> (["a", "b"], [0.7, 0.3]); `["a", "b"]` -> (…, None)."""
    if len(data_path) % 2 == 1:
        return list(data_path), None
    weights, prefixes = [], []
    for weight, prefix in zip(data_path[::2], data_path[1::2], strict=True):
        try:
            weights.append(float(weight))
        except ValueError:
            raise ValueError(
                f"--data-path {' '.join(data_path)}: {weight!r} is not a weight; give "
                "'W1 PREFIX1 W2 PREFIX2 ...' or only prefixes"
            ) from None
        prefixes.append(prefix)
    if any(w <= 0 for w in weights):
        raise ValueError(f"--data-path weights must be positive, got {weights}")
    return prefixes, weights


class BlendedDataset(torch.utils.data.Dataset):
    """A weighted mixture of datasets of the same split.

    Args:
        datasets: the components (each indexable by sample number).
        weights: relative weights (normalised here), or, with `size=None`, exact sample
            counts per dataset.
        size: samples in the blend; None takes `weights[d]` samples of dataset d (exhaustive).
        description: what identifies the components (for the cache key).
        cache_dir: where to cache the two index arrays (None: keep in memory).
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: list[float],
        size: int | None,
        description: list[dict],
        cache_dir: str | None = None,
        split_name: str = "train",
        distributed: bool = True,
    ):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(weights)} for {len(datasets)}")
        if size is not None:
            total = float(sum(weights))
            weights = [w / total for w in weights]
        self.datasets = datasets
        self.weights = weights
        self.size = size
        key: dict[str, Any] = {
            "class": "BlendedDataset",
            "datasets": description,
            "split": split_name,
        }
        key.update(weights=weights, size=size)
        cache = IndexCache(cache_dir, f"BlendedDataset-{split_name}", key)
        names = ["dataset_index", "dataset_sample_index"]
        arrays, self.built_cache = cache.build_or_load(names, self._build, distributed)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for d, dataset in enumerate(datasets):
            used = self.dataset_sample_index[self.dataset_index == d]
            if used.size and int(used.max()) >= dataset_length(dataset):
                raise ValueError(
                    f"blend needs sample {int(used.max())} of dataset {d}, which has "
                    f"{dataset_length(dataset)}"
                )

    def _build(self) -> dict[str, np.ndarray]:
        from engine.data import helpers

        if self.size is None:
            counts = np.asarray(self.weights, np.int64)
            which, nth = helpers.build_exhaustive_blending_indices(counts)
        else:
            which, nth = helpers.build_blending_indices(np.asarray(self.weights), self.size)
        return {"dataset_index": which, "dataset_sample_index": nth}

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict:
        d = int(self.dataset_index[idx])
        sample = self.datasets[d][int(self.dataset_sample_index[idx])]
        return {"dataset_id": d, **sample}


def build_blended_gpt_datasets(
    data_path: list[str],
    num_samples: tuple[int | None, int | None, int | None],
    config: GPTDatasetConfig,
    distributed: bool = True,
) -> Sequence[torch.utils.data.Dataset | None]:
    """Train, valid and test datasets for Megatron's `--data-path` (weights optional).

    One prefix gives plain GPT datasets; several give blends whose components each supply
    their weighted share of the samples (plus `SURPLUS`).
    """
    prefixes, weights = parse_data_path(data_path)
    if len(prefixes) == 1:
        return build_gpt_datasets(prefixes[0], num_samples, config, distributed)
    if weights is None:
        weights = [1.0] * len(prefixes)
    total = sum(weights)
    weights = [w / total for w in weights]

    def share(n: int | None, w: float) -> int | None:
        return None if n is None else int(math.ceil(math.ceil(n * w) * (1 + SURPLUS)))

    train, valid, test = num_samples
    per_dataset = [(share(train, w), share(valid, w), share(test, w)) for w in weights]
    components = [
        build_gpt_datasets(prefix, sizes, config, distributed)
        for prefix, sizes in zip(prefixes, per_dataset, strict=True)
    ]
    blends: list[torch.utils.data.Dataset | None] = []
    for split, (name, size) in enumerate(zip(SPLIT_NAMES, num_samples, strict=True)):
        parts = [part for c in components if (part := c[split]) is not None]
        if len(parts) < len(components):
            blends.append(None)
            continue
        if size is None:
            size = sum(len(p) for p in parts)
        description = [p.description for p in parts]
        directory = cache_dir(config, prefixes[0], "BlendedDataset")
        blends.append(
            BlendedDataset(parts, weights, size, description, directory, name, distributed)
        )
    return blends
