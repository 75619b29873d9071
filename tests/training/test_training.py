"""The trainer end to end, on real gloo ranks: `engine.training.loop.pretrain` on a preprocessed
dataset (bytes of the Python documentation that ships with the interpreter, written with the
indexed-dataset builder), with the distributed optimizer and overlapped reductions.

- TP=2 x PP=2 x DP=2 (8 ranks): the loss falls, and equals TP=1 x PP=1 x DP=1's (one rank)
  at every iteration within float32 tolerance (same seed, same samples in each global batch).
- The log line, the metrics (FLOPs per token against DESIGN.md's LLaMA-2-7B figures).
"""

from __future__ import annotations

import dataclasses
import math
import pydoc_data.topics
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpointing.config import CheckpointConfig
from engine.data.config import DataConfig
from engine.data.indexed_dataset import IndexedDatasetBuilder
from engine.distributed.config import DistributedDataParallelConfig
from engine.models.config import ModelConfig
from engine.optimizer.config import OptimizerConfig
from engine.parallel_state import ParallelConfig
from engine.training.config import JobConfig, TrainingConfig
from engine.training.metrics import IntervalMeter, IterationLog
from tests.rank_pool import RankPool, module_pool

ITERS = 8
LOG_LINE = re.compile(
    r"^iteration (\d+)/(\d+) \| loss (\d\.\d{6}E[+-]\d\d) \| lr \d\.\d{3}E[+-]\d\d \| "
    r"grad norm \S+ \| tokens/s \d+ \| "
)

pool = module_pool(8)


@pytest.fixture(scope="module")
def solo():
    """One rank (a world of one): the TP=1 x PP=1 x DP=1 reference."""
    ranks = RankPool(1)
    yield ranks
    ranks.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """An indexed dataset of byte tokens: each documentation topic of pydoc_data is one
    document (at most 4 kB of it, to keep the index small)."""
    prefix = str(tmp_path_factory.mktemp("data") / "topics")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for text in pydoc_data.topics.topics.values():
        builder.add_document(np.frombuffer(text.encode()[:4000], np.uint8).astype(np.int64))
    builder.finalize(prefix + ".idx")
    return prefix


def make_job(
    corpus: str, tp: int, pp: int, train_iters: int | None = ITERS, **sections
) -> JobConfig:
    """The tiny LLaMA on byte tokens: global batch 8 of 32 tokens, distributed optimizer."""
    job = JobConfig(
        model=ModelConfig.from_preset("tiny", vocab_size=256),
        parallel=ParallelConfig(tp, pp),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, lr_decay_style="cosine", lr_warmup_iters=2),
        ddp=DistributedDataParallelConfig(
            overlap_grad_reduce=True, use_distributed_optimizer=True, bucket_size=20_000
        ),
        training=TrainingConfig(
            micro_batch_size=2,
            global_batch_size=8,
            seq_length=32,
            train_iters=train_iters,
            eval_interval=4,
            eval_iters=2,
            log_interval=2,
        ),  # fmt: skip
        data=DataConfig(data_path=[corpus], split="90,5,5", num_workers=0),
        checkpoint=CheckpointConfig(),
    )
    return dataclasses.replace(
        job,
        **{name: dataclasses.replace(getattr(job, name), **kw) for name, kw in sections.items()},
    )


def train(job: JobConfig):
    """Runs on every rank of a pool."""
    from engine.training.loop import pretrain

    return pretrain(job)


@pytest.fixture(scope="module")
def tensorboard_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tensorboard")


@pytest.fixture(scope="module")
def baseline(pool, corpus, tensorboard_dir):
    """The uninterrupted TP=2 x PP=2 x DP=2 run the other tests compare with."""
    return pool.run(
        train, make_job(corpus, 2, 2, training={"tensorboard_dir": str(tensorboard_dir)})
    )


@pytest.fixture(scope="module")
def stopped(pool, corpus, tmp_path_factory) -> Path:
    """The same run, saving every 3 iterations and stopped by --exit-interval 4 (which saves
    too); returns --save."""
    save = tmp_path_factory.mktemp("checkpoints")
    job = make_job(corpus, 2, 2, training={"exit_interval": 4},
                   checkpoint={"save": str(save), "save_interval": 3})  # fmt: skip
    results = pool.run(train, job)
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    for result in results:
        assert result.iteration == 4 and result.exit_reason == "--exit-interval (4) reached"
        assert result.checkpoint == str(save / "iter_0000004")
    return save


def test_3d_training_learns_and_matches_one_rank(baseline, solo, corpus):
    losses = [baseline[0].losses[i] for i in range(1, ITERS + 1)]
    for rank, result in enumerate(baseline):  # every rank knows the global loss
        assert result.losses == baseline[0].losses, f"rank {rank}"
        assert result.iteration == ITERS and result.consumed_samples == 8 * ITERS
    assert losses[-1] < losses[0] - 0.8, f"the loss did not fall: {losses}"
    assert set(baseline[0].evaluations) == {4, 8}
    assert baseline[0].evaluations[8]["loss"] < baseline[0].evaluations[4]["loss"]
    assert baseline[0].test is not None

    reference = solo.run(train, make_job(corpus, 1, 1))[0]
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor([reference.losses[i] for i in range(1, ITERS + 1)], dtype=torch.float64),
        rtol=1e-5, atol=0,
    )  # fmt: skip
    assert reference.evaluations[8]["loss"] == pytest.approx(
        baseline[0].evaluations[8]["loss"], rel=1e-5
    )


def test_interleaved_pipeline_through_the_trainer_matches_one_rank(pool, solo, corpus):
    """Two model chunks per pipeline rank (4 layers, virtual pipeline size 2): every chunk
    reads its own iterator over the same microbatches."""
    four_layers = {"num_layers": 4}
    job = make_job(corpus, 2, 2, train_iters=3, model=four_layers, training={"eval_iters": 0},
                   parallel={"virtual_pipeline_model_parallel_size": 2})  # fmt: skip
    interleaved = pool.run(train, job)[0].losses
    reference = solo.run(train, make_job(corpus, 1, 1, train_iters=3, model=four_layers,
                                         training={"eval_iters": 0}))[0].losses  # fmt: skip
    for i in (1, 2, 3):
        assert interleaved[i] == pytest.approx(reference[i], rel=1e-5), i


def test_train_samples_sets_the_run_length_with_a_schedule_in_samples(solo, corpus):
    job = make_job(
        corpus, 1, 1, train_iters=None, training={"train_samples": 24, "eval_iters": 0},
        optimizer={"lr_warmup_iters": 0, "lr_warmup_samples": 16},
    )  # fmt: skip
    result = solo.run(train, job)[0]
    assert sorted(result.losses) == [1, 2, 3] and result.consumed_samples == 24


# Checkpoints: exact resume, resharding -----------------------------------------------------


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(pool, corpus, baseline, stopped):
    """Stop at 4 with the distributed optimizer, resume from the checkpoint: iterations 5-8
    give exactly the losses of the run that never stopped (float32 on the CPU)."""
    resumed = pool.run(train, make_job(corpus, 2, 2, checkpoint={"load": str(stopped)}))
    for rank, result in enumerate(resumed):
        assert sorted(result.losses) == [5, 6, 7, 8], f"rank {rank}"
        assert result.losses == {i: baseline[0].losses[i] for i in range(5, 9)}, f"rank {rank}"
        assert result.consumed_samples == baseline[0].consumed_samples


@pytest.mark.parametrize("layout", [(1, 1), (2, 1)])
def test_checkpoint_reshards_through_the_trainer(pool, solo, corpus, baseline, stopped, layout):
    """Saved at TP=2 x PP=2 x DP=2, loaded at TP=1 x PP=1 x DP=1 (one rank) and at
    TP=2 x PP=1 x DP=4 (weights, Adam moments, schedule, data position): iterations 5 and 6
    match the original run."""
    tp, pp = layout
    job = make_job(corpus, tp, pp, train_iters=6, checkpoint={"load": str(stopped)})
    # The LR schedule was built for 8 iterations; the checkpoint's schedule wins.
    result = (solo if layout == (1, 1) else pool).run(train, job)[0]
    assert sorted(result.losses) == [5, 6]
    for i in (5, 6):
        assert result.losses[i] == pytest.approx(baseline[0].losses[i], rel=1e-5), i


# Fine-tuning -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory) -> str:
    """Preprocessed SFT data (`SFTDataset.from_indexed`'s pair of datasets), byte tokens: the
    prompt is a topic's name (loss 0), the answer its first paragraph (loss 1)."""
    prefix = str(tmp_path_factory.mktemp("sft") / "topics")
    tokens = IndexedDatasetBuilder(f"{prefix}_tokens_document.bin", np.uint16)
    masks = IndexedDatasetBuilder(f"{prefix}_loss_mask_document.bin", np.uint8)
    for name, text in sorted(pydoc_data.topics.topics.items()):
        prompt = np.frombuffer(f"Q: {name}\nA: ".encode(), np.uint8)
        answer = np.frombuffer(text.strip().split("\n\n")[0][:60].encode(), np.uint8)
        tokens.add_document(np.concatenate([prompt, answer]).astype(np.int64))
        masks.add_document(np.r_[np.zeros(len(prompt)), np.ones(len(answer))].astype(np.int64))
    tokens.finalize(f"{prefix}_tokens_document.idx")
    masks.finalize(f"{prefix}_loss_mask_document.idx")
    return prefix


def fine_tune(job: JobConfig):
    from engine.training.loop import finetune

    return finetune(job)


def test_finetune_starts_from_the_weights_then_resumes_its_own_checkpoints(
    pool, corpus, sft_corpus, stopped, tmp_path
):
    """First start: the pretraining checkpoint's weights, iteration 0; it saves at 4. A restart
    with a longer run resumes from its own checkpoint at 4, not from the pretrained one."""

    def job(iters: int) -> JobConfig:
        return make_job(
            corpus, 2, 2, train_iters=iters,
            data={"data_path": [sft_corpus], "split": "80,20,0"},
            checkpoint={"load": str(stopped), "save": str(tmp_path)},
        )  # fmt: skip

    first = pool.run(fine_tune, job(4))[0]
    assert sorted(first.losses) == [1, 2, 3, 4] and first.checkpoint == str(
        tmp_path / "iter_0000004"
    )
    assert all(math.isfinite(v) for v in first.losses.values())
    assert set(first.evaluations) == {4}  # the valid split holds 15 rows: one global batch
    again = pool.run(fine_tune, job(6))[0]
    assert sorted(again.losses) == [5, 6] and again.consumed_samples == 6 * 8


# Non-finite losses ---------------------------------------------------------------------------


def train_with_fault_at(job: JobConfig, bad_iteration: int, fault: str):
    """`train`, with a fault in the first microbatch of ``bad_iteration`` on the last stage:
    ``"nan"`` makes its loss nan (as a bad batch or an overflow would), ``"sigterm"`` sends
    SIGTERM to global rank 7 only (a pre-emption notice that reaches one node first)."""
    import torch.distributed as dist

    from engine import training
    from engine.training import state
    from engine.wrappers import unwrap

    real = state.forward_step  # what the run calls per microbatch
    calls = {"n": 0}

    def faulty(data_iterator, model):
        output, loss_func = real(data_iterator, model)
        if not unwrap(model).post_process:
            return output, loss_func
        calls["n"] += 1
        if calls["n"] == 2 * (bad_iteration - 1) + 1:  # 2 microbatches per iteration
            if fault == "nan":
                output = output * float("nan")
            elif dist.get_rank() == 7:
                signal.raise_signal(signal.SIGTERM)
        return output, loss_func

    state.forward_step = faulty
    try:
        return training.pretrain(job)
    finally:
        state.forward_step = real


def test_a_nan_loss_skips_the_step_and_training_goes_on(pool, corpus, baseline):
    job = make_job(corpus, 2, 2, train_iters=4, training={"eval_iters": 0})
    for result in pool.run(train_with_fault_at, job, 2, "nan"):
        assert math.isnan(result.losses[2]) and result.nan_iterations == 1
        assert result.losses[1] == baseline[0].losses[1]
        assert all(math.isfinite(result.losses[i]) for i in (3, 4)) and result.iteration == 4


def test_exit_on_nan_saves_and_stops(pool, corpus, tmp_path):
    job = make_job(corpus, 2, 2, training={"exit_on_nan": True, "eval_iters": 0},
                   checkpoint={"save": str(tmp_path)})  # fmt: skip
    for result in pool.run(train_with_fault_at, job, 3, "nan"):
        assert result.iteration == 3 and result.exit_reason.startswith("non-finite loss (nan)")
        assert result.checkpoint == str(tmp_path / "iter_0000003")


def test_sigterm_on_one_rank_saves_and_stops_every_rank(pool, corpus, tmp_path):
    job = make_job(corpus, 2, 2, training={"eval_iters": 0}, checkpoint={"save": str(tmp_path)})
    for result in pool.run(train_with_fault_at, job, 3, "sigterm"):
        assert result.iteration == 3 and result.exit_reason == "SIGTERM received"
        assert result.checkpoint == str(tmp_path / "iter_0000003")


# TensorBoard, exits -----------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_scalars(baseline, tensorboard_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/step_time_s", "train/tflops_per_device", "train/loss_scale",
                "train/skipped_steps", "memory/rss_gb", "validation/loss", "validation/ppl",
                "test/loss"}  # fmt: skip
    assert expected <= tags, expected - tags
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == [2, 4, 6, 8]
    # Each point is the mean over its log interval.
    expected_8 = (baseline[0].losses[7] + baseline[0].losses[8]) / 2
    assert losses[8] == pytest.approx(expected_8, rel=1e-6)
    assert math.isclose(
        events.Scalars("validation/ppl")[-1].value,
        math.exp(baseline[0].evaluations[8]["loss"]),
        rel_tol=1e-5,
    )


def test_sigterm_and_duration_stop_every_rank_alike():
    from engine.training.exit import ExitConditions, SignalHandler

    with SignalHandler() as handler:
        signal.raise_signal(signal.SIGTERM)  # recorded, not fatal
        assert ExitConditions(None, None, handler).reason(3) == "SIGTERM received"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    late = ExitConditions(None, 1.0, None, start_s=0.0)
    assert late.reason(1) == "--exit-duration-in-mins (1) reached"
    assert ExitConditions(5, None, None).reason(4) is None
    assert ExitConditions(5, None, None).reason(10) == "--exit-interval (5) reached"


# The log line and the metrics ----------------------------------------------------------------


def test_log_line_starts_as_design_md_fixes_it():
    entry = IterationLog(
        iteration=20, train_iters=300, loss=5.1234567, lr=3e-4, grad_norm=1.5,
        tokens_per_s=1234.4, step_time_s=0.5, tflops_per_device=12.5, mfu=0.4, loss_scale=1.0,
        skipped_steps=0, nan_iterations=0, memory=("rss", 1.5), eta_s=140.0,
    )  # fmt: skip
    line = entry.line()
    assert LOG_LINE.match(line), line
    assert line.startswith("iteration 20/300 | loss 5.123457E+00 | lr 3.000E-04 | grad norm ")
    assert "MFU 40.0%" in line and "ETA 0:02:20" in line
    assert entry.scalars()["train/mfu"] == 0.4


def test_mfu_uses_model_flops_per_token():
    """6·N_matmul + 12·L·h·s per token (42.9 GFLOP for LLaMA-2-7B at 2048), over devices."""
    meter = IntervalMeter(ModelConfig.from_preset("llama2-7b"), 2048, world_size=8, peak_tflops=989)
    meter.add(loss=2.0, grad_norm=1.0, tokens=8 * 4096, seconds=1.0)
    entry = meter.summary(1, 10, lr=1e-4, loss_scale=1.0, skipped_steps=0, nan_iterations=0,
                          memory=("mem", 1.0))  # fmt: skip
    assert entry.tflops_per_device == pytest.approx(4096 * 42.865e9 / 1e12, rel=1e-3)
    assert entry.mfu == pytest.approx(entry.tflops_per_device / 989)
    assert entry.eta_s == pytest.approx(9.0)


def test_tensorboard_dir_without_tensorboard_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    from engine.training.metrics import TensorBoardWriter

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ImportError, match="needs the tensorboard package: pip install"):
        TensorBoardWriter(str(tmp_path))


def test_load_of_an_empty_directory_starts_from_scratch_then_resumes(pool, corpus, baseline,
                                                                      tmp_path):  # fmt: skip
    """--load = --save on the first start (nothing there yet: a warning, from scratch, the
    same losses), then the same command line again resumes at the end (nothing left to do)."""
    directory = str(tmp_path / "run")
    job = make_job(corpus, 2, 2, checkpoint={"load": directory, "save": directory})
    first = pool.run(train, job)
    assert first[0].losses == baseline[0].losses
    assert first[0].checkpoint == str(tmp_path / "run" / f"iter_{ITERS:07d}")
    again = pool.run(train, job)
    assert again[0].iteration == ITERS and again[0].losses == {}
