"""``--async-save``: the same checkpoint as a synchronous save, of the state at the save's
iteration whatever training does meanwhile, and never published half written.

- At TP=2 on 2 gloo ranks with the distributed optimizer: an async save, with the weights,
  optimizer state and schedule changed right after it returned, holds byte for byte the files
  of a synchronous save of the state before the change.
- One rank, a 44 MB state: the change happens while the writer thread is still writing.
- Through the trainer: a run stopped at iteration 4 with ``--async-save`` resumes bit for bit
  as the run that never stopped.
- A process saving asynchronously in a loop (changing every weight between saves) is killed
  at random points: the latest checkpoint always loads, consistent, never older than before.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import random
import signal
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine import parallel_state
from engine.checkpointing import (
    NonFiniteStateError,
    read_full_state,
    read_latest_iteration,
    save_checkpoint,
    save_checkpoint_async,
)
from tests.checkpointing.test_checkpointing import (
    CONSUMED,
    ITERATION,
    assert_states_equal,
    build,
    build_big,
    fake_training,
    load_latest_big,
)
from tests.rank_pool import module_pool
from tests.training.test_training import corpus, make_job, train  # noqa: F401 (a fixture)

pair = module_pool(2)
solo = module_pool(1)


def save_both_ways(sync_dir: str, async_dir: str) -> None:
    """A synchronous save, then an asynchronous one of the same state, after which training
    changes everything at once (weights, main params, moments, step, schedule)."""
    try:
        chunks, optimizer, scheduler = build(2, 1, distributed=True)
        fake_training(chunks, optimizer, scheduler)
        save_checkpoint(sync_dir, ITERATION, chunks, optimizer, scheduler, CONSUMED)
        pending = save_checkpoint_async(
            async_dir, ITERATION, chunks, optimizer, scheduler, CONSUMED
        )
        fake_training(chunks, optimizer, scheduler, steps=2)  # training goes on meanwhile
        assert read_latest_iteration(async_dir) is None  # published only by wait / poll
        assert pending.wait() == Path(async_dir) / f"iter_{ITERATION:07d}"
    finally:
        parallel_state.destroy_model_parallel()


def test_an_async_save_writes_what_a_sync_save_writes(pair, tmp_path):
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    pair.run(save_both_ways, str(sync_dir), str(async_dir))
    a, b = sync_dir / f"iter_{ITERATION:07d}", async_dir / f"iter_{ITERATION:07d}"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "metadata.json":  # shards and RNG files: byte for byte
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta_a, meta_b = (json.loads((d / "metadata.json").read_text()) for d in (a, b))
    for meta in (meta_a, meta_b):
        del meta["saved_at_unix_s"]
    assert meta_a == meta_b  # iteration, step, schedule, checksums, ...
    assert read_latest_iteration(async_dir) == ITERATION


def change_while_writing(directory: str) -> tuple[bool, float]:
    """One rank, the 44 MB crash-test model: every weight 1.0 at the save, 2.0 right after
    the async save returned; whether the writer was still writing then, and the stall."""
    try:
        chunks, optimizer = build_big()
        with torch.no_grad():
            for param in chunks[0].parameters():
                param.fill_(1.0)
        started = time.perf_counter()
        pending = save_checkpoint_async(directory, 1, chunks, optimizer, None, 0)
        stall_s = time.perf_counter() - started
        with torch.no_grad():
            for param in chunks[0].parameters():
                param.fill_(2.0)
        still_writing = not pending.written_here()
        pending.wait()
        return still_writing, stall_s
    finally:
        parallel_state.destroy_model_parallel()


def test_training_while_the_writer_runs_does_not_change_what_is_saved(solo, tmp_path):
    still_writing, stall_s = solo.run(change_while_writing, str(tmp_path))[0]
    assert still_writing, "the writer finished before the weights changed: nothing was tested"
    saved = read_full_state(tmp_path / "iter_0000001")
    for state in ("model", "param"):
        assert saved[state] and all(bool((t == 1.0).all()) for t in saved[state].values())
    print(f"async save of 44 MB: the loop stalled {stall_s * 1e3:.0f} ms")


def test_resume_from_an_async_checkpoint_is_bit_for_bit(solo, corpus, tmp_path):  # noqa: F811
    """Saving every 3 iterations asynchronously, stopped at 4 (which saves and waits);
    resumed, iterations 5-8 repeat the run that never stopped; the checkpoint's tensors equal
    a synchronous run's."""
    baseline = solo.run(train, make_job(corpus, 1, 1, training={"eval_iters": 0}))[0]
    stopped: dict[bool, Path] = {}
    for async_save in (True, False):
        save = tmp_path / ("async" if async_save else "sync")
        job = make_job(corpus, 1, 1, training={"exit_interval": 4, "eval_iters": 0},
                       checkpoint={"save": str(save), "save_interval": 3,
                                   "async_save": async_save})  # fmt: skip
        result = solo.run(train, job)[0]
        assert result.checkpoint == str(save / "iter_0000004")
        assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
        stopped[async_save] = save
    for state, tensors in read_full_state(stopped[True] / "iter_0000004").items():
        expected = read_full_state(stopped[False] / "iter_0000004")[state]
        assert_states_equal(tensors, expected, state)
    resumed = solo.run(train, make_job(corpus, 1, 1, training={"eval_iters": 0},
                                       checkpoint={"load": str(stopped[True])}))[0]  # fmt: skip
    assert resumed.losses == {i: baseline.losses[i] for i in range(5, 9)}


def async_save_with_nan(directory: str) -> str:
    """A good async save at 3, then one at 4 whose state holds an inf on rank 1 only: its
    publication is refused on every rank, the tmp directory removed."""
    try:
        chunks, optimizer, scheduler = build(2, 1, distributed=True)
        fake_training(chunks, optimizer, scheduler)
        save_checkpoint_async(directory, 3, chunks, optimizer, scheduler, CONSUMED).wait()
        if dist.get_rank() == 1:
            with torch.no_grad():
                next(chunks[0].module.parameters()).view(-1)[0] = float("inf")
        pending = save_checkpoint_async(
            directory, 4, chunks, optimizer, scheduler, CONSUMED, None, 1
        )
        with pytest.raises(NonFiniteStateError) as error:
            pending.wait()
        return str(error.value)
    finally:
        parallel_state.destroy_model_parallel()


def test_an_async_save_of_non_finite_state_is_never_published(pair, tmp_path):
    for message in pair.run(async_save_with_nan, str(tmp_path)):
        assert "not saved" in message and "on rank 1" in message, message
    assert read_latest_iteration(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003", "latest_checkpointed_iteration.txt",
    ]  # fmt: skip


def keep_saving_async(directory: str, first_iteration: int, ready: Event) -> None:
    """A single-rank job that "trains" (every weight set to the iteration number) and saves
    each iteration asynchronously, waiting for the previous save first, until it is killed."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    chunks, optimizer = build_big()
    ready.set()
    pending = None
    for iteration in itertools.count(first_iteration):
        with torch.no_grad():  # the previous save's writer may still be running
            for param in chunks[0].parameters():
                param.fill_(float(iteration))
        if pending is not None:
            pending.wait()
        pending = save_checkpoint_async(
            directory, iteration, chunks, optimizer, None, iteration, None, 2
        )


def test_a_process_killed_during_async_writes_keeps_the_previous_latest(solo, tmp_path):
    context = mp.get_context("fork")
    rng = random.Random(1)
    last, interrupted = -1, 0
    for trial in range(3):
        ready = context.Event()
        saver = context.Process(target=keep_saving_async, args=(str(tmp_path), last + 1, ready))
        saver.start()
        assert ready.wait(60), "the saving process did not start"
        while read_latest_iteration(tmp_path) in (None, last):  # at least one new save
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        interrupted += any(p.suffix == ".tmp" for p in tmp_path.iterdir())
        iteration, consumed, consistent = solo.run(load_latest_big, str(tmp_path))[0]
        assert consistent and consumed == iteration, f"trial {trial}: iteration {iteration}"
        assert iteration > last, f"trial {trial}: went back from {last} to {iteration}"
        last = iteration
    print(f"async crash safety: 3 kills, {interrupted} during a write")
    assert interrupted >= 1


def test_the_async_save_flag_needs_save():
    from engine.checkpointing.config import CheckpointConfig
    from engine.training.arguments import build_parser

    assert CheckpointConfig(async_save=True).errors() == ["--async-save needs --save"]
    assert CheckpointConfig(save="/ckpt", async_save=True).errors() == []
    help_text = build_parser().format_help()
    assert "--async-save" in help_text
