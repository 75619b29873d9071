"""When a run stops early: SIGTERM (a scheduler's pre-emption notice), ``--exit-duration-in-mins``
and ``--exit-interval``; and when its launcher dies (`exit_with_launcher`).

Every rank must take the same decision at the same iteration, or some ranks would wait
forever in the checkpoint's collectives for ranks that went on training. A signal reaches
ranks at different moments (or only some of them), and clocks differ, so each rank's local
view is all-reduced (MAX) once per iteration: if any rank wants to stop, all stop.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from engine.device import default_device


class SignalHandler:
    """Records that a signal arrived instead of dying on it; restores the old handler on
    `release`. A context manager."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.received = False
        # What signal.signal returned: the handler to restore (a function, SIG_DFL or SIG_IGN).
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def __enter__(self) -> SignalHandler:
        try:
            self._previous = signal.signal(self.signum, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous = None
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None


class ExitConditions:
    """Decides, identically on every rank, whether to save and stop after an iteration.

    Args:
        exit_interval: stop when the iteration is a multiple of this (``--exit-interval``).
        exit_duration_in_mins: stop once this much wall time has passed since ``start_s``.
        handler: the SIGTERM handler whose flag is consulted.
        start_s: when the run started (``time.time()``).
    """

    def __init__(
        self,
        exit_interval: int | None,
        exit_duration_in_mins: float | None,
        handler: SignalHandler | None,
        start_s: float | None = None,
    ):
        self.exit_interval = exit_interval
        self.exit_duration_s = None if exit_duration_in_mins is None else exit_duration_in_mins * 60
        self.handler = handler
        self.start_s = time.time() if start_s is None else start_s

    def reason(self, iteration: int) -> str | None:
        """Why to stop after ``iteration`` (None: go on). Collective over the world."""
        local = 0
        if self.handler is not None and self.handler.received:
            local = 2
        elif self.exit_duration_s is not None and time.time() - self.start_s > self.exit_duration_s:
            local = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            # On the collective backend's device (NCCL reduces accelerator tensors only).
            flag = torch.tensor([float(local)], device=default_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        if local == 2:
            return "SIGTERM received"
        if local == 1:
            assert self.exit_duration_s is not None  # every rank has the same configuration
            return f"--exit-duration-in-mins ({self.exit_duration_s / 60:g}) reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"--exit-interval ({self.exit_interval}) reached"
        return None


LAUNCHER_POLL_S = 1.0
"""How often a rank checks that its torchrun agent is still there."""


def exit_with_launcher(poll_s: float = LAUNCHER_POLL_S) -> threading.Thread | None:
    """Under torchrun, end this rank (and its DataLoader workers) when the agent that started
    it dies; returns the watching thread (None when not started by torchrun).

    An agent killed with SIGKILL cannot stop its workers: they would go on training (and hold
    their devices) to the end, as orphans. Nothing is saved: a killed agent means the job is
    being torn down, and a restart resumes from the last checkpoint. A process started by a
    shell is left alone (``nohup``, a closed terminal: a changed parent means nothing there).
    """
    global _watcher
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    if _watcher is not None:  # one watch per process, however many runs it makes
        return _watcher
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        try:  # the agent's pipes may have gone with it: the exit must not depend on them
            print(
                f"rank {os.environ.get('RANK', '?')}: its torchrun agent (pid {launcher}) is "
                "gone; exiting",
                file=sys.stderr,
                flush=True,
            )
        finally:
            if os.getpgrp() == os.getpid():
                # torchrun starts each rank as a process-group leader: this takes the rank's
                # DataLoader workers with it at once.
                os.killpg(os.getpid(), signal.SIGKILL)
            os._exit(1)

    _watcher = threading.Thread(target=watch, name="exit-with-launcher", daemon=True)
    _watcher.start()
    return _watcher


_watcher: threading.Thread | None = None
