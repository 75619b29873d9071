"""Noticing that a run has diverged, or that its gradients vanish, instead of skipping steps to
the end: ``--check-for-nan-in-loss-and-grad`` with ``--max-consecutive-skipped-steps``, and a
warning when fp16 gradients underflow to zero.

A diverged run (``--lr`` far too high, a bad batch that poisoned the optimizer state) shows up
as a non-finite loss or a non-finite gradient norm on every step: the optimizer skips the
update, and nothing else would stop it. An fp16 overflow while the dynamic loss scale can
still back off is not divergence: the scaler is doing its job, so those skips do not count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)

UNDERFLOW_STEPS = 3
"""Consecutive steps with an exactly-zero gradient norm before the underflow warning."""


class TrainingDivergedError(RuntimeError):
    """The run stopped because too many consecutive steps had non-finite losses or gradients
    (the last good checkpoint is kept: nothing is saved after the divergence)."""


@dataclass
class StepOutcome:
    """What one iteration did, as the guard needs it."""

    iteration: int
    loss: float
    updated: bool
    """The optimizer applied the update."""
    grad_norm: float | None
    """None when no norm was computed (non-finite loss, or an fp16 overflow)."""
    rescalable_overflow: bool = False
    """An fp16 overflow while the dynamic loss scale can still shrink (does not count)."""


class DivergenceGuard:
    """Counts consecutive non-finite steps and stops the run past ``max_consecutive``.

    Args:
        enabled: ``--check-for-nan-in-loss-and-grad``; off, non-finite steps are only
            skipped (the loop's historical behaviour).
        max_consecutive: ``--max-consecutive-skipped-steps``.
        fp16: the run computes in fp16 (the underflow warning then names the loss scale).
        warn: this rank logs the warnings (rank 0; every rank counts and raises alike, since
            the losses and the skip decisions are global).
    """

    def __init__(self, enabled: bool, max_consecutive: int, fp16: bool = False, warn: bool = True):
        self.enabled, self.max_consecutive, self.fp16 = enabled, max_consecutive, fp16
        self.warn = warn
        self.consecutive = 0
        self.first_bad: int | None = None
        self.zero_norm_steps = 0

    @property
    def in_streak(self) -> bool:
        """The last step was skipped for non-finite values (and the check is on)."""
        return self.enabled and self.consecutive > 0

    def observe(self, step: StepOutcome, loss_scale: float = 1.0) -> None:
        """Account for one iteration; raises `TrainingDivergedError` past the limit."""
        self._check_underflow(step, loss_scale)
        bad = not step.updated and not step.rescalable_overflow
        if not bad:
            self.consecutive, self.first_bad = 0, None
            return
        self.consecutive += 1
        if self.first_bad is None:
            self.first_bad = step.iteration
        if self.enabled and self.consecutive > self.max_consecutive:
            what = (
                f"loss {step.loss}"
                if not math.isfinite(step.loss)
                else f"gradient norm {step.grad_norm}"
            )
            raise TrainingDivergedError(
                f"the run diverged: {self.consecutive} consecutive iterations "
                f"({self.first_bad}..{step.iteration}) had a non-finite loss or gradients (last: "
                f"{what}), more than --max-consecutive-skipped-steps ({self.max_consecutive}); "
                f"stopping without saving, so the last good checkpoint stays the latest. Resume "
                f"from it with a lower --lr (or --clip-grad), or skip the data that caused it"
            )

    def _check_underflow(self, step: StepOutcome, loss_scale: float) -> None:
        """Warn once per streak when the gradients are exactly zero for `UNDERFLOW_STEPS` steps
        (under fp16 a loss scale too small flushes every gradient to zero: nothing trains)."""
        if step.grad_norm != 0.0:
            self.zero_norm_steps = 0
            return
        self.zero_norm_steps += 1
        if self.zero_norm_steps != UNDERFLOW_STEPS or not self.warn:
            return
        if self.fp16:
            logger.warning(
                "the gradient norm has been exactly 0 for %d steps (iterations %d..%d) under "
                "--fp16 with loss scale %g: the fp16 gradients underflow. Raise --loss-scale, or "
                "leave it out for the dynamic loss scale",
                UNDERFLOW_STEPS, step.iteration - UNDERFLOW_STEPS + 1, step.iteration, loss_scale,
            )  # fmt: skip
        else:
            logger.warning(
                "the gradient norm has been exactly 0 for %d steps (iterations %d..%d): nothing "
                "is training (frozen parameters, or a loss that does not depend on them?)",
                UNDERFLOW_STEPS, step.iteration - UNDERFLOW_STEPS + 1, step.iteration,
            )  # fmt: skip
