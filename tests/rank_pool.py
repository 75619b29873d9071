"""A pool of real `torch.distributed` ranks (gloo) that stays up for a whole test module.

Starting processes that import torch costs seconds on two cores, so a module starts one pool
and runs many checks in it::

    pool = RankPool(world_size=4)
    results = pool.run(check_fn, arg)   # check_fn(arg) runs on every rank; one result per rank
    pool.close()

Workers are forked from the test process (the check functions are already imported there) and
start the default process group once. A check that raises on any rank fails the call with that
rank's traceback; the pool is then restarted, because the other ranks may be stuck in a
collective.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch

_CHECK_TIMEOUT_S = 300.0


class RankFailure(RuntimeError):
    """A check raised on one of the ranks (or timed out)."""


def _worker(rank: int, world_size: int, init_file: str, conn) -> None:
    import torch.distributed as dist

    # One intra-op thread per rank: several ranks share two cores, and a forked child must not
    # re-enter an OpenMP pool created by its parent.
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    status = 0
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        while True:
            message = conn.recv()
            if message is None:
                break
            fn, args, kwargs = message
            try:
                result = ("ok", pickle.dumps(fn(*args, **kwargs)))
            except BaseException:  # noqa: BLE001 - the traceback goes back to the test
                result = ("error", f"rank {rank}:\n{traceback.format_exc()}")
            conn.send(result)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        status = 1
        try:
            conn.send(("error", f"rank {rank} failed to start:\n{traceback.format_exc()}"))
        except OSError:
            pass
    finally:
        conn.close()
        os._exit(status)  # skip the forked pytest's atexit handlers


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else names[0]


class RankPool:
    """`world_size` gloo ranks that run the functions given to `run` in lock step."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._procs: list[mp.Process] = []
        self._conns: list[Any] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        fd, init_file = tempfile.mkstemp(prefix="rank_pool_")
        os.close(fd)
        os.unlink(init_file)  # the file store creates it; a stale one would confuse it
        self._init_file = init_file
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(rank, self.world_size, init_file, child_end), daemon=True
            )
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        results, errors = [], []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(_CHECK_TIMEOUT_S):
                errors.append(f"rank {rank}: no answer within {_CHECK_TIMEOUT_S:.0f} s")
                continue
            try:
                status, payload = conn.recv()
            except EOFError:
                errors.append(f"rank {rank}: process died (exit code {self._procs[rank].exitcode})")
                continue
            if status == "ok":
                results.append(pickle.loads(payload))
            else:
                errors.append(payload)
        if errors:
            self.close()
            raise RankFailure(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return results

    def close(self) -> None:
        """Stop the ranks (politely, then by force)."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)


def module_pool(world_size: int):
    """A module-scoped pytest fixture named by the assignment: ``pool = module_pool(4)``."""
    import pytest

    @pytest.fixture(scope="module")
    def pool():
        ranks = RankPool(world_size)
        yield ranks
        ranks.close()

    return pool
