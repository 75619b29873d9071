"""Blended datasets: the mix follows the weights at every prefix, samples come from the right
component, the exhaustive blend uses every sample once, and the indices are cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data.blended_dataset import BlendedDataset, build_blended_gpt_datasets, parse_data_path
from engine.data.gpt_dataset import GPTDatasetConfig
from tests.data.test_gpt_dataset import make_corpus


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    for i, name in enumerate(("web", "code")):
        make_corpus(root / name, num_docs=200, seed=i)
    return str(root / "web"), str(root / "code")


def test_parse_data_path():
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_data_path(["a"]) == (["a"], None)
    with pytest.raises(ValueError, match="'x' is not a weight"):
        parse_data_path(["x", "a", "0.3", "b"])
    with pytest.raises(ValueError, match="must be positive"):
        parse_data_path(["0", "a", "1", "b"])


def test_weighted_blend(tmp_path, prefixes):
    web, code = prefixes
    config = GPTDatasetConfig(seq_length=8, split="9,1,0", path_to_cache=str(tmp_path))
    train, valid, test = build_blended_gpt_datasets(
        ["0.7", web, "0.3", code], (1000, 50, None), config
    )
    assert test is None and len(train) == 1000 and len(valid) == 50
    which = np.asarray(train.dataset_index)
    for n in (10, 100, 1000):  # the greedy blend keeps every prefix on the weights
        assert abs((which[:n] == 0).sum() - 0.7 * n) <= 1
    for i in (0, 1, 2, 500, 999):
        sample = train[i]
        component = train.datasets[sample["dataset_id"]]
        expected = component[int(train.dataset_sample_index[i])]
        assert torch.equal(sample["tokens"], expected["tokens"])
    for d in (0, 1):  # each component's samples are taken in order, none past its end
        used = np.asarray(train.dataset_sample_index)[which == d]
        np.testing.assert_array_equal(used, np.arange(len(used)))
        assert len(used) <= len(train.datasets[d])
    again = build_blended_gpt_datasets(["0.7", web, "0.3", code], (1000, 50, None), config)[0]
    assert train.built_cache and not again.built_cache
    np.testing.assert_array_equal(again.dataset_index, train.dataset_index)


def test_exhaustive_blend_uses_every_sample_once(tmp_path):
    datasets = [list(range(5)), list(range(100, 103)), list(range(200, 207))]
    parts = [[{"x": v} for v in d] for d in datasets]
    blend = BlendedDataset(parts, [5, 3, 7], None, [{"name": i} for i in range(3)])
    got = sorted(blend[i]["x"] for i in range(len(blend)))
    assert got == sorted(sum(datasets, []))
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset(parts, [1.0], 10, [])
    with pytest.raises(ValueError, match="needs sample 7 of dataset 1, which has 3"):
        BlendedDataset(parts, [0.1, 0.8, 0.1], 10, [{"name": i} for i in range(3)])
