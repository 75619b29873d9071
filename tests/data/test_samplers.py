"""Data-parallel samplers: ranks partition each global batch, and a sampler restarted from
`consumed_samples` continues exactly where the uninterrupted one was."""

from __future__ import annotations

from itertools import islice

import pytest

from engine.data.samplers import PretrainingSampler, RandomSampler


def all_ranks(make, dp: int, steps: int | None = None) -> list[list[list[int]]]:
    """batches[step][rank] for every rank of a DP group."""
    per_rank = [list(islice(iter(make(rank)), steps)) for rank in range(dp)]
    return [list(step) for step in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_pretraining_sampler_partitions_and_resumes(drop_last):
    total, micro, dp = 103, 4, 3  # 103 = 8 global batches of 12, plus 7

    def make(consumed):
        return lambda rank: PretrainingSampler(total, consumed, micro, rank, dp, drop_last)

    run = all_ranks(make(0), dp)
    assert len(run) == len(make(0)(0)) == (8 if drop_last else 9)
    seen = [i for step in run for batch in step for i in batch]
    assert seen == list(range(96 if drop_last else 103))  # in order, each once
    for step in run[:8]:
        assert all(len(batch) == micro for batch in step)
    for k in range(1, 8):  # resume after k global batches
        assert all_ranks(make(k * micro * dp), dp) == run[k:]
    with pytest.raises(ValueError, match="consumed_samples=103 is not below total_samples=103"):
        PretrainingSampler(total, 103, micro, 0, dp)
    with pytest.raises(ValueError, match="data_parallel_rank=3 is outside"):
        PretrainingSampler(total, 0, micro, 3, dp)


def test_random_sampler_epochs_partition_and_resume():
    total, micro, dp, seed = 50, 2, 4, 11  # 48 samples an epoch, 6 global batches

    def make(consumed, seed=seed):
        return lambda rank: RandomSampler(total, consumed, micro, rank, dp, seed)

    run = all_ranks(make(0), dp, steps=18)  # three epochs
    for epoch in range(3):
        indices = [i for step in run[epoch * 6 : (epoch + 1) * 6] for b in step for i in b]
        assert sorted(indices) == list(range(48))  # each sample once per epoch
    assert run[:6] != run[6:12]  # a new shuffle each epoch
    for k in (1, 5, 6, 7, 13):
        assert all_ranks(make(k * micro * dp), dp, steps=18 - k) == run[k:]
    assert all_ranks(make(0, seed=12), dp, steps=6) != run[:6]
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        next(iter(make(3)(0)))


def test_data_loader_resumes_mid_run():
    import torch

    from engine.data.samplers import build_data_loader

    dataset = [torch.tensor([i, 10 * i]) for i in range(40)]
    full = list(build_data_loader(dataset, 0, 3, 1, 2))
    resumed = list(build_data_loader(dataset, 12, 3, 1, 2))  # after 2 global batches
    assert len(full) == 6 and len(resumed) == 4
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a, b)
    assert full[0][:, 0].tolist() == [3, 4, 5]  # rank 1 takes the second micro-batch
    shuffled = build_data_loader(dataset, 0, 3, 1, 2, shuffle=True, seed=5)
    first = next(iter(shuffled))
    again = next(iter(build_data_loader(dataset, 0, 3, 1, 2, shuffle=True, seed=5)))
    assert torch.equal(first, again) and first.shape == (3, 2)
