"""Saving in the background (``--async-save``): training stalls only while the state is copied
to host memory; a thread on each rank writes the files; the checkpoint is published by a
collective step on the main thread once every rank's writer is done.

The steps, on every rank::

    pending = save_checkpoint_async(save_dir, iteration, model_chunks, ...)
        # collective: rank 0 creates iter_0000100.tmp/; every rank copies its weights,
        # optimizer state and RNG streams to CPU memory it owns (`take_snapshot`, copy=True)
        # and starts its writer thread; returns as soon as the copy is done
    ... training goes on, updating the live tensors in place ...
    pending.poll()    # at iteration boundaries: one all-reduce of "my writer is done"; when
                      # every rank's is, finishes the save (below) and returns its directory
    pending.wait()    # at the next save, before exiting, at the end: join and finish

Finishing is exactly a synchronous save's last step (`engine.checkpointing.protocol.finish_save`):
any rank's write failure raised on every rank, the finite check, ``metadata.json`` with every
file's checksum, the atomic rename, ``latest``, ``keep_last_n``. Until then nothing is
published: a job killed while the writer runs leaves the previous checkpoint as the latest
(and an ``.tmp`` directory the next save removes). One save at a time: the caller waits for
the previous one before starting the next (`engine.training.checkpoint` does).

The writer thread runs no collective and touches no live tensor; hashing, file writes
and ``torch`` kernels release the GIL, so training runs meanwhile (on a machine with cores to
spare for it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.checkpointing.protocol import (
    SaveRequest,
    begin_save,
    finish_save,
    write_or_error,
)
from engine.checkpointing.snapshot import RankSnapshot, WrittenFiles, take_snapshot
from engine.optimizer.lr_schedule import OptimizerParamScheduler
from engine.optimizer.optimizer import MixedPrecisionOptimizer


class AsyncSave:
    """One checkpoint being written by a background thread on this rank (see the module
    docstring). `poll` and `wait` are collective: every rank calls them at the same points."""

    def __init__(self, request: SaveRequest, snapshot: RankSnapshot, flag_device: torch.device):
        self.request = request
        self.nbytes = snapshot.nbytes()
        self._snapshot: RankSnapshot | None = snapshot
        self._flag_device = flag_device
        self._written: WrittenFiles | None = None
        self._error: Exception | None = None
        self._published: Path | None = None
        self._thread = threading.Thread(
            target=self._write, name=f"checkpoint-writer-{request.iteration}", daemon=True
        )  # a daemon: a job that dies mid-write must not wait for it (nothing is published)
        self._thread.start()

    @property
    def iteration(self) -> int:
        return self.request.iteration

    @property
    def finished(self) -> bool:
        """Published (or failed) already: `poll` and `wait` have nothing left to do."""
        return self._snapshot is None

    def _write(self) -> None:
        assert self._snapshot is not None
        self._written, self._error = write_or_error(self.request.tmp, self._snapshot)

    def written_here(self) -> bool:
        """This rank's writer is done (no communication)."""
        return not self._thread.is_alive()

    def poll(self) -> Path | None:
        """Collective and cheap (one all-reduce of a flag): when every rank's writer is done,
        publish the checkpoint and return its directory; None while some rank still writes
        (or when already finished)."""
        if self.finished:
            return None
        done = torch.tensor([1 if self.written_here() else 0], device=self._flag_device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if not int(done.item()):
            return None
        return self.wait()

    def abandon(self) -> None:
        """Never publish this save (local, no collective): wait for this rank's writer, so
        that it cannot write into a later save's ``.tmp`` directory of the same iteration,
        and free the host copy. The ``.tmp`` directory is removed by the next save."""
        self._thread.join()
        self._snapshot = None

    def wait(self) -> Path:
        """Collective: wait for this rank's writer, then publish (`finish_save`); returns the
        checkpoint's directory. Raises what `save_checkpoint` raises (`NonFiniteStateError`,
        `CheckpointError`), on every rank."""
        if self._published is not None:
            return self._published
        self._thread.join()
        snapshot, self._snapshot = self._snapshot, None  # the host copy is freed once published
        assert snapshot is not None, "wait() after a failed finish"
        written = self._written if self._written is not None else WrittenFiles()
        self._published = finish_save(self.request, snapshot, written, self._error)
        return self._published


def save_checkpoint_async(
    save_dir: str | Path,
    iteration: int,
    model_chunks: Sequence[nn.Module],
    optimizer: MixedPrecisionOptimizer | None,
    lr_scheduler: OptimizerParamScheduler | None,
    consumed_samples: int,
    config_dict: dict[str, Any] | None = None,
    keep_last_n: int | None = None,
    save_rng: bool = True,
) -> AsyncSave:
    """Start saving what `engine.checkpointing.save_checkpoint` saves (collective, same
    arguments), returning once this rank's state is copied to host memory; the files are
    written in the background. Publish with the returned `AsyncSave`'s ``poll`` / ``wait``.
    """
    request = begin_save(save_dir, iteration, model_chunks, consumed_samples, config_dict,
                         keep_last_n)  # fmt: skip
    snapshot = take_snapshot(model_chunks, optimizer, lr_scheduler, True, save_rng)
    # The flag's all-reduce runs where the model's tensors are (CPU under gloo, the GPU's
    # own device under NCCL), never on a hard-coded device.
    flag_device = next(iter(model_chunks[0].parameters())).device
    return AsyncSave(request, snapshot, flag_device)
