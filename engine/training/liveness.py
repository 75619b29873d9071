"""Failures bounded in time: a rank that dies or stalls makes the others fail within
``--distributed-timeout-minutes`` with a message naming the operation and the ranks that did
not answer, and a step much slower than the recent ones is logged as a straggler.

The process group's timeout bounds every collective and point-to-point wait (gloo raises when
it expires; NCCL's watchdog aborts). What the raw error lacks is context: which part of the
iteration was waiting, and for whom. `CollectiveFailureError` adds both; the ranks that did
not answer are found through the job's key-value store (the rendezvous store, which outlives
a stalled rank): each failing rank writes a key, waits a little for the others to do the same,
and names the ranks that never did.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque

import torch.distributed as dist

logger = logging.getLogger(__name__)

STRAGGLER_FACTOR = 3.0
"""A step this many times slower than the recent median is a straggler..."""
STRAGGLER_MIN_EXCESS_S = 1.0
"""...when it is also this much slower (short steps jitter by more than 3x)."""
STRAGGLER_WINDOW = 20
"""Recent steps the median is taken over (the first `STRAGGLER_WARMUP` are not counted)."""
STRAGGLER_WARMUP = 2
"""Steps that warm caches and allocators up."""
REPORT_WAIT_S = 30.0
"""At most this long a failing rank waits for the others' reports (a third of the timeout when
that is shorter: ranks blocked elsewhere time out about as late as this one)."""

_COMMUNICATION_ERRORS = (
    "Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
    "Connection refused", "NCCL", "Broken pipe",
)  # fmt: skip


class CollectiveFailureError(RuntimeError):
    """A collective or a send/receive failed (its peers died, stalled past the timeout, or
    went away): raised on each rank that saw it, with the operation and the silent ranks."""


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` came from the process group's transport rather than from the
    computation (gloo raises plain RuntimeErrors; newer torch raises DistError subclasses)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _COMMUNICATION_ERRORS)


def silent_ranks(tag: str, timeout_s: float) -> list[int] | None:
    """Report this rank's failure under ``tag`` in the job's store and return the ranks that
    have not reported theirs after a short wait (None: the store is unreachable too)."""
    if not dist.is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set(f"engine/failure/{tag}/{rank}", "1")
        keys = [f"engine/failure/{tag}/{r}" for r in range(world)]
        deadline = time.monotonic() + min(REPORT_WAIT_S, max(timeout_s / 3, 1.0))
        while True:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # the store's host went with the failure: nothing more to learn
        return None


def describe_failure(
    error: BaseException, phase: str, iteration: int, timeout_minutes: float
) -> CollectiveFailureError:
    """The error to raise in place of the transport's ``error``, seen in ``phase`` of
    ``iteration``: names this rank, the operation and the ranks that did not answer."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    silent = silent_ranks(f"{iteration}", timeout_minutes * 60)
    if silent is None:
        who = "the job's store is unreachable too, so the silent ranks are unknown"
    elif silent:
        who = f"ranks that did not report a failure (dead or stalled): {silent}"
    else:
        who = "every rank reported the failure (a network problem, or a rank restarted?)"
    return CollectiveFailureError(
        f"rank {rank}: {phase} of iteration {iteration} failed waiting for other ranks "
        f"(--distributed-timeout-minutes {timeout_minutes:g}): {first_line}; {who}"
    )


class StragglerMonitor:
    """Warns (on the logging rank) when a step takes far longer than the recent median: a
    slow or briefly stalled rank, or the file system, holding everyone up."""

    def __init__(self, timeout_minutes: float, warn: bool = True):
        self.timeout_minutes, self.warn = timeout_minutes, warn
        self.recent: deque[float] = deque(maxlen=STRAGGLER_WINDOW)
        self.seen = 0

    def observe(self, iteration: int, step_s: float) -> str | None:
        """Account for one step; returns the warning when it was a straggler."""
        self.seen += 1
        if self.seen <= STRAGGLER_WARMUP:
            return None
        message = None
        if len(self.recent) >= 3:
            median = statistics.median(self.recent)
            if step_s > STRAGGLER_FACTOR * median and step_s - median > STRAGGLER_MIN_EXCESS_S:
                message = (
                    f"straggler: iteration {iteration} took {step_s:.2f} s, "
                    f"{step_s / median:.0f}x the median {median:.3f} s of the last "
                    f"{len(self.recent)} iterations (a slow or stalled rank, or I/O); a wait "
                    f"longer than --distributed-timeout-minutes ({self.timeout_minutes:g}) "
                    f"fails the job"
                )
                if self.warn:
                    logger.warning(message)
        self.recent.append(step_s)
        return message
