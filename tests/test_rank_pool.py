"""The multi-rank harness itself: real gloo collectives, errors carried back with the rank."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.rank_pool import RankFailure, RankPool


def _all_reduce_rank() -> tuple[int, float]:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("deliberate")
    return dist.get_rank()


def _fail_while_others_wait() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 leaves the collective")
    dist.all_reduce(torch.ones(1))  # the others wait for rank 1 forever


def _stall_the_first_time(marker_dir: str) -> int:
    marker = os.path.join(marker_dir, f"rank{dist.get_rank()}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)  # far past the pool's deadline: the first attempt times out
    return dist.get_rank()


def test_a_check_that_stalls_everywhere_is_retried_once_on_fresh_ranks(tmp_path):
    pool = RankPool(world_size=2, check_timeout_s=3.0)
    try:
        with pytest.warns(UserWarning, match=r"ranks \[0, 1\] gave no answer in 3 s"):
            assert pool.run(_stall_the_first_time, str(tmp_path)) == [0, 1]
    finally:
        pool.close()


def test_pool_runs_collectives_and_reports_errors():
    pool = RankPool(world_size=3)
    try:
        assert pool.run(_all_reduce_rank) == [(0, 3.0), (1, 3.0), (2, 3.0)]
        with pytest.raises(RankFailure, match="(?s)rank 1:.*ValueError: deliberate"):
            pool.run(_fail_on_rank_one)
        # The pool restarts after a failure.
        assert pool.run(_all_reduce_rank) == [(0, 3.0), (1, 3.0), (2, 3.0)]
        # Ranks stuck in a collective are killed rather than waited for (the deadline is
        # shortened so the check stays quick); the next check gets fresh ranks.
        pool.check_timeout_s = 5.0
        with pytest.raises(RankFailure, match="(?s)rank 1 leaves the collective.*no answer"):
            pool.run(_fail_while_others_wait)
        assert pool.run(_all_reduce_rank) == [(0, 3.0), (1, 3.0), (2, 3.0)]
    finally:
        pool.close()
