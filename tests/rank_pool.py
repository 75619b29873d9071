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
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

_GLOO_RENDEZVOUS_FAILURE = "Gloo connectFullMesh failed"


class RankFailure(RuntimeError):
    """A check raised on one of the ranks (or timed out)."""


def _worker(rank: int, world_size: int, conn) -> None:
    import torch.distributed as dist

    # One intra-op thread per rank: several ranks share two cores, and a forked child must not
    # re-enter an OpenMP pool created by its parent.
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    status = 0
    try:
        # Rank 0 serves the TCP store on a port the OS picks (no race for a "free" port) and
        # tells the others through the parent. Every `new_group` goes through this store.
        if rank == 0:
            store = dist.TCPStore(
                "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False
            )
            conn.send(("port", store.port))
        else:
            store = dist.TCPStore("127.0.0.1", conn.recv(), world_size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
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

    def __init__(self, world_size: int, check_timeout_s: float = 240.0):
        self.world_size = world_size
        self.check_timeout_s = check_timeout_s
        self._procs: list[mp.Process] = []
        self._conns: list[Any] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, self.world_size, child_end), daemon=True)
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        first = self._conns[0]
        if not first.poll(self.check_timeout_s):
            self.close()
            raise RankFailure("rank 0 did not start its TCP store")
        status, payload = first.recv()
        if status != "port":
            self.close()
            raise RankFailure(payload)
        for conn in self._conns[1:]:
            conn.send(payload)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        A check that no rank answers in time (and that raised nowhere), or that failed in
        gloo's group rendezvous, is run once more on fresh ranks, with a warning: under heavy
        load gloo's ``connectFullMesh`` has been seen to stall, or to fail with "Connection
        closed by peer", outside this project's code. Any other failure is reported at once.
        """
        for attempt in (1, 2):
            if not self._procs:
                self._start()
            try:
                for conn in self._conns:
                    conn.send((fn, args, kwargs))
                results, errors, timed_out = self._collect()
            except BaseException:
                # Interrupted (e.g. by pytest-timeout): ranks may be stuck in a collective,
                # and the next check must not queue behind them.
                self.close(wait_s=0)
                raise
            if not errors:
                return results
            self.close(wait_s=0)
            stalled = bool(timed_out) and len(timed_out) == len(errors)
            rendezvous_failed = any(_GLOO_RENDEZVOUS_FAILURE in error for error in errors)
            if attempt == 2 or not (stalled or rendezvous_failed):
                break
            why = (
                f"ranks {timed_out} gave no answer in {self.check_timeout_s:.0f} s"
                if stalled
                else "gloo's group rendezvous failed"
            )
            warnings.warn(f"{fn.__name__}: {why}; retrying once on fresh ranks", stacklevel=2)
        raise RankFailure(f"{fn.__name__} failed:\n" + "\n".join(errors))

    def _collect(self) -> tuple[list[Any], list[str], list[int]]:
        """Results in rank order, error texts, and the ranks that did not answer in time."""
        results, errors, timed_out = [], [], []
        deadline = time.monotonic() + self.check_timeout_s
        for rank, conn in enumerate(self._conns):
            if not conn.poll(max(deadline - time.monotonic(), 0)):
                errors.append(f"rank {rank}: no answer within {self.check_timeout_s:.0f} s")
                timed_out.append(rank)
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
        return results, errors, timed_out

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the ranks: ask them to leave, wait up to ``wait_s`` each, then kill."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=wait_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []


def module_pool(world_size: int):
    """A module-scoped pytest fixture named by the assignment: ``pool = module_pool(4)``."""
    import pytest

    @pytest.fixture(scope="module")
    def pool():
        ranks = RankPool(world_size)
        yield ranks
        ranks.close()

    return pool
