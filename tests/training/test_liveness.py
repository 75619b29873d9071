"""Failures bounded in time (``--distributed-timeout-minutes``): a rank stalled (SIGSTOP) for
less than the timeout is logged as a straggler with the step time, and the run goes on; stalled
past it, the other rank fails within the timeout, naming the operation and the silent rank.

One real torchrun of 2 ranks (DP=2) with a 15-second timeout.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from engine.training.liveness import StragglerMonitor
from tests.training.test_preemption import ranks_and_workers, start_training, wait_for_line
from tests.training.test_training import corpus  # noqa: F401 (a fixture)

TIMEOUT_MINUTES = 0.25


def test_a_short_stall_is_a_straggler_and_a_long_one_fails_the_job_naming_the_rank(
    corpus,  # noqa: F811
    tmp_path,
):
    process = start_training(
        corpus, tmp_path / "ckpt", "--num-workers", "0",
        "--distributed-timeout-minutes", str(TIMEOUT_MINUTES),
    )  # fmt: skip
    try:
        wait_for_line(process, r"^iteration 6/")
        ranks, _ = ranks_and_workers(process.pid)
        stalled = max(ranks)  # rank 1: torchrun starts local rank 1 second
        os.kill(stalled, signal.SIGSTOP)
        time.sleep(3)
        os.kill(stalled, signal.SIGCONT)
        # The stall's straggler line (under load, shorter ones of its own may come first).
        warning = wait_for_line(process, r"straggler: iteration \d+ took ([3-9]|1\d)\.")[-1]
        step_s = float(re.search(r"took ([\d.]+) s", warning).group(1))
        assert 2.5 < step_s < TIMEOUT_MINUTES * 60, warning
        assert f"--distributed-timeout-minutes ({TIMEOUT_MINUTES:g})" in warning
        wait_for_line(process, r"^iteration \d+/")  # it goes on
        os.kill(stalled, signal.SIGSTOP)
        stopped_at = time.monotonic()
        lines = wait_for_line(process, r"^error: rank 0:", timeout_s=90)
        waited_s = time.monotonic() - stopped_at
        os.kill(stalled, signal.SIGCONT)  # let torchrun's SIGTERM reach it
        out, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    error = lines[-1]
    assert "failed waiting for other ranks" in error, error
    assert f"(--distributed-timeout-minutes {TIMEOUT_MINUTES:g})" in error
    assert re.search(r"rank 0: the (forward-backward pass|optimizer step|exit check)", error)
    assert "did not report a failure (dead or stalled): [1]" in error, error
    # The timeout, then a few seconds waiting for the other ranks' reports.
    assert TIMEOUT_MINUTES * 60 <= waited_s < TIMEOUT_MINUTES * 60 + 30, waited_s
    assert process.returncode != 0


@pytest.mark.parametrize(
    "steps_s, warned", [([0.05] * 10 + [3.0], True), ([1.0] * 10 + [1.9], False)]
)
def test_the_straggler_rule(steps_s, warned):
    monitor = StragglerMonitor(timeout_minutes=10, warn=False)
    messages = [monitor.observe(i + 1, s) for i, s in enumerate(steps_s)]
    assert (messages[-1] is not None) == warned and not any(messages[:-1])
