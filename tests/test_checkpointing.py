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

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from engine import parallel_state
from engine.checkpointing import (
    load_checkpoint,
    read_full_state,
    read_latest_iteration,
    save_checkpoint,
)
from engine.config import DistributedDataParallelConfig, OptimizerConfig
from engine.distributed import DistributedDataParallel
from engine.models import ModelConfig
from engine.models.weights import gather_full_state
from engine.optimizer import build_lr_scheduler, build_optimizer
from engine.pipeline_parallel.partition import build_model_chunks
from engine.tensor_parallel.random import get_rng_tracker, model_parallel_seed
from tests.rank_pool import module_pool

CONFIG = ModelConfig.from_preset("tiny-gqa", num_query_groups=1, vocab_size=1100, num_layers=4)
OPTIMIZER = OptimizerConfig(lr=1e-2, lr_warmup_iters=2, lr_decay_style="cosine")
ITERATION, CONSUMED = 3, 48

pool = module_pool(8)
solo = module_pool(1)


def build(
    tp: int, pp: int, distributed: bool, vpp: int | None = None, **overrides
) -> tuple[list, object, object]:
    """Model chunks (DDP-wrapped), optimizer and LR schedule under a fresh TP x PP layout."""
    parallel_state.initialize_model_parallel(tp, pp, vpp)
    model_parallel_seed(1234)
    config = ModelConfig(**{**CONFIG.__dict__, **overrides})
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=distributed, bucket_size=20_000)
    chunks = [DistributedDataParallel(c, ddp) for c in build_model_chunks(config)]
    optimizer = build_optimizer(OPTIMIZER, chunks)
    return chunks, optimizer, build_lr_scheduler(optimizer, OPTIMIZER, train_iters=100)


def fake_training(chunks: list, optimizer, scheduler, steps: int = ITERATION) -> None:
    """AdamW steps on seeded gradients (the same at a buffer position on every rank, so
    replicated parameters stay replicated)."""
    for step in range(steps):
        optimizer.zero_grad()
        buffers = [buffer for chunk in chunks for buffer in chunk.buffers]
        for i, buffer in enumerate(buffers):
            generator = torch.Generator().manual_seed(1000 * step + i)
            buffer.grad_data.copy_(torch.randn(buffer.grad_data.shape, generator=generator))
        zero_padding_grads(chunks)
        assert optimizer.step().updated
        scheduler.step(1)


def zero_padding_grads(chunks: list) -> None:
    """Vocabulary padding rows never get a real gradient (the loss masks them out), so the
    checkpoint does not keep them: fake gradients must not move them either."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for layer in ("embedding", "output_layer"):
            weight = getattr(getattr(chunk.module, layer, None), "weight", None)
            if weight is not None:
                rows = weight.size(0)
                weight.main_grad[max(0, min(rows, CONFIG.vocab_size - rank * rows)) :] = 0


def stage_weights(chunks: list) -> dict[str, torch.Tensor]:
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
