"""A diverged run stops (``--check-for-nan-in-loss-and-grad``, ``--max-consecutive-skipped-steps``)
instead of skipping steps to the end; fp16 gradients that underflow to zero are warned about.

End to end on one real rank of the trainer (`pretrain` on the byte-token corpus), and the
guard's counting rules on their own.
"""

from __future__ import annotations

import logging
import math

import pytest

from engine.training.divergence import (
    UNDERFLOW_STEPS,
    DivergenceGuard,
    StepOutcome,
    TrainingDivergedError,
)
from tests.training.test_training import corpus, make_job, solo  # noqa: F401 (fixtures)


def train_capturing(job):
    """`pretrain` on a rank; returns (result or the divergence message, warnings logged)."""
    from engine.training.loop import pretrain

    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Capture(logging.WARNING)
    logging.getLogger("engine").addHandler(handler)
    try:
        return pretrain(job), records
    except TrainingDivergedError as error:
        return str(error), records
    finally:
        logging.getLogger("engine").removeHandler(handler)


def test_a_diverged_run_stops_past_the_skipped_step_limit_keeping_the_last_good_checkpoint(
    solo,  # noqa: F811
    corpus,  # noqa: F811
    tmp_path,
):
    save = tmp_path / "ckpt"
    job = make_job(
        corpus, 1, 1, train_iters=60,
        optimizer={"lr": 1e6, "lr_warmup_iters": 0, "clip_grad": 0.0},
        training={"max_consecutive_skipped_steps": 3, "log_interval": 1, "eval_interval": 1000},
        checkpoint={"save": str(save), "save_interval": 1},
    )  # fmt: skip
    [(message, _)] = solo.run(train_capturing, job)
    assert isinstance(message, str), f"the run went to the end: {message}"
    assert "diverged: 4 consecutive iterations" in message
    assert "--max-consecutive-skipped-steps (3)" in message
    first, last = (int(n) for n in message.split("(")[1].split(")")[0].split(".."))
    assert last == first + 3 and last < 60
    # Checkpoints stop at the last iteration that updated the model: nothing after the first
    # non-finite step is saved (that state is the last good one, and it stays the latest).
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest == first - 1
    assert not any(int(p.name[5:]) >= first for p in save.glob("iter_*"))


def test_without_the_check_non_finite_steps_are_only_skipped(solo, corpus):  # noqa: F811
    job = make_job(
        corpus, 1, 1, train_iters=16,
        optimizer={"lr": 1e6, "lr_warmup_iters": 0, "clip_grad": 0.0},
        training={"max_consecutive_skipped_steps": 3, "check_for_nan_in_loss_and_grad": False},
    )  # fmt: skip
    [(result, _)] = solo.run(train_capturing, job)
    assert not isinstance(result, str), result
    assert result.iteration == 16
    assert result.skipped_steps + result.nan_iterations > 3


def test_fp16_gradients_that_underflow_to_zero_are_warned_about(solo, corpus):  # noqa: F811
    # Weights initialised below fp16's smallest subnormal (6e-8) are all 0 in fp16, and so is
    # every gradient: what a loss scale too small for the gradients does to a real run.
    job = make_job(
        corpus, 1, 1, train_iters=UNDERFLOW_STEPS + 1,
        model={"init_method_std": 1e-12}, optimizer={"fp16": True, "loss_scale": 1.0},
    )  # fmt: skip
    [(result, warnings)] = solo.run(train_capturing, job)
    assert not isinstance(result, str), result
    [warning] = [w for w in warnings if "underflow" in w]
    assert f"exactly 0 for {UNDERFLOW_STEPS} steps" in warning
    assert "--fp16 with loss scale 1" in warning and "Raise --loss-scale" in warning


def outcome(iteration: int, loss: float = 2.0, updated: bool = True, **kw) -> StepOutcome:
    return StepOutcome(iteration, loss, updated, kw.pop("grad_norm", 1.0), **kw)


def test_the_guard_counts_only_consecutive_non_finite_steps():
    guard = DivergenceGuard(enabled=True, max_consecutive=2)
    for iteration in (1, 2):
        guard.observe(outcome(iteration, math.nan, updated=False, grad_norm=None))
    guard.observe(outcome(3))  # a good step resets the count
    for iteration in (4, 5):
        guard.observe(outcome(iteration, grad_norm=math.inf, updated=False))
    with pytest.raises(TrainingDivergedError, match=r"3 consecutive iterations \(4\.\.6\)"):
        guard.observe(outcome(6, grad_norm=math.inf, updated=False))


def test_fp16_overflows_the_loss_scale_can_absorb_do_not_count():
    guard = DivergenceGuard(enabled=True, max_consecutive=1, fp16=True)
    for iteration in range(1, 40):  # the dynamic scale backing off from 2^32
        guard.observe(outcome(iteration, updated=False, grad_norm=None, rescalable_overflow=True))
    guard.observe(outcome(40, updated=False, grad_norm=None))  # at the minimum scale: counts
    with pytest.raises(TrainingDivergedError):
        guard.observe(outcome(41, updated=False, grad_norm=None))


def test_the_check_can_be_turned_off():
    guard = DivergenceGuard(enabled=False, max_consecutive=0)
    for iteration in range(1, 10):
        guard.observe(outcome(iteration, math.nan, updated=False, grad_norm=None))
    assert guard.consecutive == 9


def run_examples_pretrain(argv: list[str]) -> int:
    from examples.pretrain import main

    return main(argv)


def test_examples_pretrain_exits_non_zero_with_the_message(solo, corpus):  # noqa: F811
    argv = (
        "--model-preset tiny --vocab-size 256 --micro-batch-size 2 --global-batch-size 4 "
        "--seq-length 32 --train-iters 60 --eval-iters 0 --lr 1e6 --clip-grad 0 "
        f"--max-consecutive-skipped-steps 2 --num-workers 0 --data-path {corpus}"
    ).split()
    assert solo.run(run_examples_pretrain, argv) == [1]
