"""Sharded checkpoints: round trip, resharding across TP/PP/DP, fine-tuning, errors, safety.

Optimizer state comes from a few AdamW steps on seeded fake gradients written straight into
the DDP gradient buffers (no forward pass is needed to exercise the state); the trainer's
tests cover exact resume of real training. The model has one K/V head (replicated over TP=2,
fused into Q|K|V at TP=1) and a vocabulary that TP=1 and TP=2 pad differently, so resharding
has to split, re-fuse and re-pad tensors.

The resharding checks compare *canonical* full tensors (`read_full_state`): the checkpoint
saved at TP=2 x PP=2 x DP=2 with the distributed optimizer, loaded at another layout and saved
again there, must hold bit-identical weights, fp32 main params and Adam moments.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import signal
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from engine import parallel_state
from engine.checkpointing import (
    LATEST_FILE,
    CheckpointError,
    load_checkpoint,
    open_checkpoint,
    read_full_state,
    read_latest_iteration,
    save_checkpoint,
)
from engine.checkpointing.integrity import checksum_file
from engine.checkpointing.rng import load_pickle
from engine.distributed import DistributedDataParallel
from engine.distributed.config import DistributedDataParallelConfig
from engine.models import ModelConfig
from engine.models.build import build_model_chunks
from engine.models.weights import gather_full_state
from engine.optimizer import (
    MixedPrecisionOptimizer,
    OptimizerParamScheduler,
    build_lr_scheduler,
    build_optimizer,
)
from engine.optimizer.config import OptimizerConfig
from engine.tensor_parallel.random import get_rng_tracker, model_parallel_seed
from tests.rank_pool import module_pool

CONFIG = ModelConfig.from_preset("tiny-gqa", num_query_groups=1, vocab_size=1100, num_layers=4)
OPTIMIZER = OptimizerConfig(lr=1e-2, lr_warmup_iters=2, lr_decay_style="cosine")
ITERATION, CONSUMED = 3, 48

pool = module_pool(8)
solo = module_pool(1)


def build(
    tp: int,
    pp: int,
    distributed: bool,
    vpp: int | None = None,
    optimizer_bf16: bool = False,
    **overrides,
) -> tuple[list[DistributedDataParallel], MixedPrecisionOptimizer, OptimizerParamScheduler]:
    """Model chunks (DDP-wrapped), optimizer and LR schedule under a fresh TP x PP layout;
    ``overrides`` change `CONFIG`."""
    parallel_state.initialize_model_parallel(tp, pp, vpp)
    model_parallel_seed(1234)
    config = dataclasses.replace(CONFIG, **overrides)
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=distributed, bucket_size=20_000)
    chunks = [DistributedDataParallel(c, ddp) for c in build_model_chunks(config)]
    opt = dataclasses.replace(OPTIMIZER, bf16=optimizer_bf16)
    optimizer = build_optimizer(opt, chunks)
    return chunks, optimizer, build_lr_scheduler(optimizer, opt, train_iters=100)


def fake_training(
    chunks: list[DistributedDataParallel],
    optimizer: MixedPrecisionOptimizer,
    scheduler: OptimizerParamScheduler,
    steps: int = ITERATION,
) -> None:
    """AdamW steps on seeded gradients (the same at a buffer position on every rank, so
    replicated parameters stay replicated)."""
    for step in range(steps):
        optimizer.zero_grad()
        buffers = [buffer for chunk in chunks for buffer in chunk.grad_buffers]
        for i, buffer in enumerate(buffers):
            generator = torch.Generator().manual_seed(1000 * step + i)
            buffer.grad_data.copy_(torch.randn(buffer.grad_data.shape, generator=generator))
        zero_padding_grads(chunks)
        assert optimizer.step().updated
        scheduler.step(1)


def zero_padding_grads(chunks: list[DistributedDataParallel]) -> None:
    """Vocabulary padding rows never get a real gradient (the loss masks them out), so the
    checkpoint does not keep them: fake gradients must not move them either."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for layer in ("embedding", "output_layer"):
            weight = getattr(getattr(chunk.module, layer, None), "weight", None)
            if weight is not None:
                rows = weight.size(0)
                weight.main_grad[max(0, min(rows, CONFIG.vocab_size - rank * rows)) :] = 0


def stage_weights(chunks: list[DistributedDataParallel]) -> dict[str, torch.Tensor]:
    weights = {}
    for chunk in chunks:
        weights.update(gather_full_state(chunk.module))
    return weights


def draws() -> list[float]:
    """One draw from every stream a checkpoint restores."""
    with get_rng_tracker().fork():
        tracker = torch.rand(1).item()
    return [torch.rand(1).item(), tracker, random.random(), float(np.random.rand())]


def assert_states_equal(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: {actual.keys() ^ expected.keys()}"
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{what}: {name} differs"


# Round trip at one layout, then resharding ------------------------------------------------


def save_and_reload(directory: str) -> dict:
    """TP=2 x PP=2 x DP=2, distributed optimizer: save, then load into a model built with
    another init seed, a fresh optimizer and schedule and disturbed RNG streams."""
    try:
        chunks, optimizer, scheduler = build(2, 2, distributed=True)
        fake_training(chunks, optimizer, scheduler)
        seed = 7 + dist.get_rank()
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        started = time.perf_counter()
        save_checkpoint(
            directory, ITERATION, chunks, optimizer, scheduler, CONSUMED,
            config_dict={"optimizer": OPTIMIZER, "note": "test"},
        )  # fmt: skip
        save_s = time.perf_counter() - started
        expected = {
            "draws": draws(), "optimizer": optimizer.local_state_dict(),
            "schedule": scheduler.state_dict(), "weights": stage_weights(chunks),
        }  # fmt: skip

        chunks, optimizer, scheduler = None, None, None
        parallel_state.destroy_model_parallel()
        chunks, optimizer, scheduler = build(2, 2, distributed=True, init_seed=99)
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        started = time.perf_counter()
        assert load_checkpoint(directory, chunks, optimizer, scheduler) == (ITERATION, CONSUMED)
        load_s = time.perf_counter() - started
        assert draws() == expected["draws"]
        assert scheduler.state_dict() == expected["schedule"]
        assert_states_equal(stage_weights(chunks), expected["weights"], "weights")
        local, saved = optimizer.local_state_dict(), expected["optimizer"]
        assert [s["name"] for s in local["shards"]] == [s["name"] for s in saved["shards"]]
        for mine, theirs in zip(local["shards"], saved["shards"], strict=True):
            for key in ("param", "exp_avg", "exp_avg_sq"):
                assert torch.equal(mine[key], theirs[key]), f"{mine['name']} {key}"
        assert local["step"] == saved["step"] == ITERATION
        return {"weights": expected["weights"], "save_s": save_s, "load_s": load_s}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def saved_3d(pool, tmp_path_factory) -> tuple[Path, list[dict]]:
    directory = tmp_path_factory.mktemp("tp2pp2dp2")
    return directory, pool.run(save_and_reload, str(directory))


def test_round_trip_restores_weights_optimizer_schedule_and_rng(saved_3d):
    directory, per_rank = saved_3d
    metadata = json.loads((directory / "iter_0000003" / "metadata.json").read_text())
    assert metadata["layout"] == {
        "world_size": 8, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
        "virtual_pipeline_model_parallel_size": None, "data_parallel_size": 2,
        "context_parallel_size": 1,
    }  # fmt: skip
    assert metadata["use_distributed_optimizer"] and metadata["consumed_samples"] == CONSUMED
    assert metadata["config"]["optimizer"]["lr"] == OPTIMIZER.lr
    assert metadata["model"]["hidden_size"] == CONFIG.hidden_size
    assert read_latest_iteration(directory) == ITERATION
    files = sorted(p.name for p in (directory / "iter_0000003").iterdir())
    assert sum(f.startswith("model_") for f in files) == 4  # TP x PP, DP rank 0 only
    assert sum(f.startswith("optim_") for f in files) == 8  # every rank owns a DP slice
    print(
        f"TP2xPP2xDP2 save {max(r['save_s'] for r in per_rank):.2f} s, "
        f"load {max(r['load_s'] for r in per_rank):.2f} s"
    )


def load_and_resave(source: str, target: str, tp: int, pp: int, distributed: bool,
                    vpp: int | None = None) -> None:  # fmt: skip
    """Load ``source`` under this layout into a differently initialised model, check the
    weights against the checkpoint's canonical tensors, and save at this layout."""
    try:
        chunks, optimizer, scheduler = build(tp, pp, distributed, vpp, init_seed=99)
        assert load_checkpoint(source, chunks, optimizer, scheduler) == (ITERATION, CONSUMED)
        saved = read_full_state(Path(source) / "iter_0000003")["model"]
        for name, weight in stage_weights(chunks).items():
            assert torch.equal(weight, saved[name]), name
        save_checkpoint(target, ITERATION, chunks, optimizer, scheduler, CONSUMED)
    finally:
        parallel_state.destroy_model_parallel()


def assert_same_checkpoint(a: Path, b: Path) -> None:
    full_a, full_b = read_full_state(a / "iter_0000003"), read_full_state(b / "iter_0000003")
    for state in ("model", "param", "exp_avg", "exp_avg_sq"):
        assert full_a[state], state
        assert_states_equal(full_b[state], full_a[state], f"{b.name} {state}")
    meta_a, meta_b = (json.loads((d / "iter_0000003/metadata.json").read_text()) for d in (a, b))
    assert meta_a["lr_scheduler"] == meta_b["lr_scheduler"]


def test_reshard_to_one_rank_without_distributed_optimizer(solo, saved_3d, tmp_path):
    source = saved_3d[0]
    solo.run(load_and_resave, str(source), str(tmp_path), 1, 1, False)
    assert_same_checkpoint(source, tmp_path)


def test_reshard_to_tp2_dp4_and_back_to_interleaved_3d(pool, solo, saved_3d, tmp_path):
    source, tp2dp4, tp1, vpp = saved_3d[0], tmp_path / "tp2dp4", tmp_path / "tp1", tmp_path / "vpp"
    pool.run(load_and_resave, str(source), str(tp2dp4), 2, 1, True)
    assert_same_checkpoint(source, tp2dp4)
    # From a TP=1 checkpoint without the distributed optimizer to TP2 x PP2 (2 chunks) x DP2.
    solo.run(load_and_resave, str(source), str(tp1), 1, 1, False)
    pool.run(load_and_resave, str(tp1), str(vpp), 2, 2, True, 2)
    assert_same_checkpoint(source, vpp)


# Fine-tuning: weights only ----------------------------------------------------------------


def finetune_bf16(source: str) -> None:
    """``finetune=True``: the weights load (into a bf16 model: the fp32 main params follow
    them), the optimizer and schedule stay fresh, and the run starts at iteration 0."""
    try:
        chunks, optimizer, scheduler = build(
            1, 1, False, init_seed=99, params_dtype=torch.bfloat16, optimizer_bf16=True
        )
        assert load_checkpoint(source, chunks, optimizer, scheduler, finetune=True) == (0, 0)
        saved = read_full_state(Path(source) / "iter_0000003")["model"]
        for name, weight in stage_weights(chunks).items():
            assert weight.dtype == torch.bfloat16
            assert torch.equal(weight, saved[name].to(torch.bfloat16)), name
        local = optimizer.local_state_dict()
        assert local["step"] == 0 and scheduler.num_steps == 0
        for shard, (_, param) in zip(local["shards"], optimizer.named_parameters(), strict=True):
            assert torch.equal(shard["param"], param.detach().float().view(-1)), shard["name"]
            assert not shard["exp_avg"].any() and not shard["exp_avg_sq"].any()
    finally:
        parallel_state.destroy_model_parallel()


def test_finetune_loads_weights_only(solo, saved_3d):
    solo.run(finetune_bf16, str(saved_3d[0]))


def save_tied_weights(directory: str) -> None:
    """A tied embedding at PP=2 (the last stage holds a copy), weights only."""
    try:
        chunks, optimizer, scheduler = build(2, 2, True, tie_word_embeddings=True)
        fake_training(chunks, optimizer, scheduler, steps=1)
        save_checkpoint(directory, ITERATION, chunks, None, None, CONSUMED)
    finally:
        parallel_state.destroy_model_parallel()


def load_tied(source: str, tp: int, pp: int) -> dict[str, str]:
    """Weights into a tied model; a weights-only checkpoint refuses to fill an optimizer."""
    try:
        chunks, optimizer, _ = build(tp, pp, False, tie_word_embeddings=True, init_seed=99)
        assert load_checkpoint(source, chunks) == (ITERATION, CONSUMED)
        embedding = read_full_state(Path(source) / "iter_0000003")["model"]["embedding.weight"]
        weights = stage_weights(chunks)
        for name in ("embedding.weight", "output_layer.weight"):  # the copy is the original
            assert name not in weights or torch.equal(weights[name], embedding), name
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(source, chunks, optimizer)
        return {"no optimizer": str(error.value)}
    finally:
        parallel_state.destroy_model_parallel()


def test_tied_embedding_reshards_and_weights_only_checkpoint(pool, solo, tmp_path):
    pool.run(save_tied_weights, str(tmp_path))
    message = solo.run(load_tied, str(tmp_path), 1, 1)[0]["no optimizer"]
    assert "holds no optimizer state" in message and "--finetune" in message
    pool.run(load_tied, str(tmp_path), 2, 2)


# Errors -----------------------------------------------------------------------------------


def load_errors(source: str, scratch: str) -> dict[str, str]:
    """The message of every way a load can fail (model at TP=1)."""
    messages = {}

    def capture(
        what: str,
        directory: str | Path,
        chunks: list,
        optimizer: MixedPrecisionOptimizer | None = None,
    ) -> None:
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(directory, chunks, optimizer)
        messages[what] = str(error.value)

    scratch = Path(scratch)
    try:
        chunks, optimizer, _ = build(1, 1, False, hidden_size=128, num_layers=2)
        capture("architecture", source, chunks)
        parallel_state.destroy_model_parallel()
        chunks, optimizer, _ = build(1, 1, False)
        capture("missing", scratch / "empty", chunks)
        copy = scratch / "copy"
        shutil.copytree(source, copy)
        (copy / "iter_0000003" / "optim_tp01_pp00_dp01.safetensors").unlink()
        capture("partial", copy, chunks, optimizer)
        drop_from_metadata(copy, "optim_tp01_pp00_dp01.safetensors")  # the list agrees now
        capture("slice", copy, chunks, optimizer)
        (copy / "iter_0000003" / "metadata.json").unlink()
        capture("incomplete", copy, chunks)
        (copy / LATEST_FILE).write_text("3x")
        capture("latest", copy, chunks)
        return messages
    finally:
        parallel_state.destroy_model_parallel()


def record_checksum(final: Path, name: str) -> None:
    """Record file ``name``'s current checksum in checkpoint ``final``'s metadata, as if the
    save had written it so (to reach the checks behind the checksum)."""
    path = final / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata["checksums"]["files"][name] = checksum_file(final / name)
    path.write_text(json.dumps(metadata))


def drop_from_metadata(directory: Path, name: str) -> None:
    path = directory / "iter_0000003" / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata["files"].remove(name)
    path.write_text(json.dumps(metadata))


def test_incompatible_missing_and_partial_checkpoints_are_clear_errors(solo, saved_3d, tmp_path):
    source = saved_3d[0]
    messages = solo.run(load_errors, str(source), str(tmp_path))[0]
    metadata = source / "iter_0000003" / "metadata.json"
    assert (
        "hidden size 64 in the checkpoint vs 128 in the model (--hidden-size)"
        in (messages["architecture"])
    )
    assert (
        "num layers 4 in the checkpoint vs 2 in the model (--num-layers)"
        in (messages["architecture"])
    )
    assert str(metadata) in messages["architecture"]
    assert "no checkpoint in" in messages["missing"] and "--load" in messages["missing"]
    assert "partial checkpoint" in messages["partial"]
    assert "optim_tp01_pp00_dp01.safetensors" in messages["partial"]
    # Without that file, TP rank 1's first-stage parameters lack a DP slice of their state.
    slice_message = messages["slice"]
    assert "partial checkpoint: the shards of" in slice_message
    assert "(param) cover" in slice_message and "elements on TP rank 1" in slice_message
    assert "incomplete checkpoint" in messages["incomplete"]
    assert "metadata.json" in messages["incomplete"]
    assert "'3x'" in messages["latest"]


def load_partial(source: str) -> str:
    try:
        chunks, optimizer, scheduler = build(2, 2, True)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(source, chunks, optimizer, scheduler)
        return str(error.value)
    finally:
        parallel_state.destroy_model_parallel()


def test_a_shard_missing_on_some_ranks_fails_every_rank(pool, saved_3d, tmp_path):
    """Only TP rank 1 of stage 0 lacks state; the others must not wait for it forever."""
    copy = tmp_path / "copy"
    shutil.copytree(saved_3d[0], copy)
    (copy / "iter_0000003" / "optim_tp01_pp00_dp01.safetensors").unlink()
    drop_from_metadata(copy, "optim_tp01_pp00_dp01.safetensors")
    messages = pool.run(load_partial, str(copy))
    assert all("partial checkpoint" in m for m in messages[:4]), messages  # first stage
    assert all("failed on rank 0 (of 4)" in m for m in messages[4:]), messages  # second


def save_blocked(directory: str) -> str:
    """Rank 0 cannot replace the ``latest`` file (a directory is in its way)."""
    try:
        chunks, optimizer, scheduler = build(2, 2, True)
        with pytest.raises(CheckpointError) as error:
            save_checkpoint(directory, ITERATION, chunks, optimizer, scheduler, CONSUMED)
        return str(error.value)
    finally:
        parallel_state.destroy_model_parallel()


def test_a_save_failing_on_rank_0_fails_every_rank(pool, tmp_path):
    (tmp_path / LATEST_FILE).mkdir()
    messages = pool.run(save_blocked, str(tmp_path))
    assert all("publishing" in m and "failed on rank 0 (of 1)" in m for m in messages), messages


class _Exploit:
    """Unpickling this calls ``open(marker, "w")``: any code could run instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def load_with_exploit(directory: str, marker: str) -> str:
    """Save at this layout (so the RNG file is read back), plant a code-running pickle as
    this rank's RNG file, load."""
    try:
        chunks, optimizer, scheduler = build(1, 1, False)
        final = save_checkpoint(directory, ITERATION, chunks, optimizer, scheduler, CONSUMED)
        torch.save({"torch": _Exploit(marker)}, final / "rng_rank00000.pt")
        record_checksum(final, "rng_rank00000.pt")  # as if saved so: the checksum matches
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(directory, chunks, optimizer, scheduler)
        assert isinstance(error.value.__cause__, pickle.UnpicklingError)
        assert str(final / "rng_rank00000.pt") in str(error.value)
        return str(error.value)
    finally:
        parallel_state.destroy_model_parallel()


def test_a_pickle_that_would_run_code_is_refused(solo, tmp_path):
    marker = tmp_path / "exploited"
    message = solo.run(load_with_exploit, str(tmp_path / "ckpt"), str(marker))[0]
    assert "weights_only" in message.replace(" ", "_").lower() or "Weights only" in message
    assert not marker.exists()
    # The planted file really is an exploit: an unsafe load runs it.
    torch.load(tmp_path / "ckpt" / "iter_0000003" / "rng_rank00000.pt", weights_only=False)
    assert marker.exists()
    with pytest.raises(CheckpointError) as error:
        load_pickle(tmp_path / "ckpt" / "iter_0000003" / "rng_rank00000.pt")
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)


# keep_last_n and crash safety -------------------------------------------------------------


def save_several(
    directory: str, iterations: list[int], keep_last_n: int | None, save_rng: bool = True
) -> None:
    try:
        chunks, optimizer, scheduler = build(1, 1, False)
        for iteration in iterations:
            save_checkpoint(
                directory, iteration, chunks, optimizer, scheduler, 0, None, keep_last_n,
                save_rng,
            )  # fmt: skip
    finally:
        parallel_state.destroy_model_parallel()


def test_no_save_rng_leaves_the_rng_files_out(solo, tmp_path):
    solo.run(save_several, str(tmp_path), [1], None, False)
    saved = tmp_path / "iter_0000001"
    assert not list(saved.glob("rng_rank*.pt"))
    assert not any(name.startswith("rng_") for name in open_checkpoint(tmp_path)[1]["files"])


def test_keep_last_n_deletes_older_checkpoints_after_the_new_one(solo, tmp_path):
    solo.run(save_several, str(tmp_path), [1, 2, 3], 2)
    (tmp_path / "iter_0000009.tmp").mkdir()  # left by a killed save
    solo.run(save_several, str(tmp_path), [4], 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003", "iter_0000004", LATEST_FILE,
    ]  # fmt: skip
    assert read_latest_iteration(tmp_path) == 4
    open_checkpoint(tmp_path, 3)  # the older one kept is complete


BIG = dataclasses.replace(CONFIG, hidden_size=128, ffn_hidden_size=352, vocab_size=8000)
CRASH_TRIALS = 5


def build_big() -> tuple[list[DistributedDataParallel], MixedPrecisionOptimizer]:
    parallel_state.initialize_model_parallel()
    chunks = [DistributedDataParallel(c) for c in build_model_chunks(BIG)]
    return chunks, build_optimizer(OPTIMIZER, chunks)


def keep_saving(directory: str, first_iteration: int, ready: Event) -> None:
    """A single-rank job that saves iteration after iteration (every weight, and so every fp32
    main param, equal to the iteration number) until it is killed."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    chunks, optimizer = build_big()
    ready.set()
    for iteration in itertools.count(first_iteration):
        with torch.no_grad():
            for param in chunks[0].parameters():
                param.fill_(float(iteration))
        save_checkpoint(directory, iteration, chunks, optimizer, None, iteration, None, 2)


def load_latest_big(directory: str) -> tuple[int, int, bool]:
    """(iteration, consumed samples, every weight equals the iteration) of the latest."""
    try:
        chunks, optimizer = build_big()
        iteration, consumed = load_checkpoint(directory, chunks, optimizer)
        weights = stage_weights(chunks).values()  # canonical: without vocabulary padding
        consistent = all(bool((w == iteration).all()) for w in weights)
        for path in Path(directory).glob("iter_???????"):  # every published one is complete
            open_checkpoint(directory, int(path.name[5:]))
        return iteration, consumed, consistent
    finally:
        parallel_state.destroy_model_parallel()


def test_a_save_killed_at_random_points_leaves_the_previous_checkpoint_loadable(solo, tmp_path):
    context = mp.get_context("fork")
    rng = random.Random(0)
    last, interrupted, save_s = -1, 0, None
    for trial in range(CRASH_TRIALS):
        ready = context.Event()
        saver = context.Process(target=keep_saving, args=(str(tmp_path), last + 1, ready))
        saver.start()
        assert ready.wait(60), "the saving process did not start"
        if save_s is None:  # calibrate: wait for the first save, time one
            while read_latest_iteration(tmp_path) is None:
                time.sleep(0.01)
            started = time.perf_counter()
            while read_latest_iteration(tmp_path) == 0:
                time.sleep(0.01)
            save_s = time.perf_counter() - started
        time.sleep(rng.uniform(0.0, 2.5 * save_s))
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        interrupted += any(p.suffix in (".tmp", ".trash") for p in tmp_path.iterdir())
        iteration, consumed, consistent = solo.run(load_latest_big, str(tmp_path))[0]
        assert consistent and consumed == iteration, f"trial {trial}: iteration {iteration}"
        assert iteration >= last, f"trial {trial}: went back from {last} to {iteration}"
        last = iteration
    print(f"crash safety: {CRASH_TRIALS} kills, {interrupted} mid-save, one save {save_s:.2f} s")
    assert interrupted >= 1
