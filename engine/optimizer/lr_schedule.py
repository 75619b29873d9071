"""Learning-rate and weight-decay schedules, counted in iterations or in samples.

The schedule is a pure function of one counter, ``num_steps``: iterations when the job is
configured with ``--train-iters`` (``step(1)`` per iteration), samples with
``--train-samples`` (``step(global_batch_size)``). Shapes, all linear warm-up from
``init_lr`` to ``max_lr`` over ``warmup_steps``, then, until ``decay_steps``:

- constant: ``max_lr``;
- linear: ``min + (max - min) * (1 - r)`` with ``r = (n - warmup) / (decay - warmup)``;
- cosine: ``min + (max - min) * (cos(pi r) + 1) / 2``;
- inverse-square-root: ``max * sqrt(warmup) / sqrt(n)``, floored at ``min_lr``;
- WSD (warm-up, stable, decay): ``max_lr`` until ``decay - wsd_decay_steps``, then one of
  exponential ``2 * 0.5^q - 1``, linear ``1 - q``, cosine, minus_sqrt ``1 - sqrt(q)`` of the
  fraction ``q`` of the final decay span;

and ``min_lr`` after ``decay_steps``. Weight decay moves from ``start_wd`` to ``end_wd``
over ``wd_incr_steps`` (constant, linear or cosine). Param groups may carry ``lr_mult`` and
``wd_mult`` (``wd_mult = 0`` for norms and biases).
"""

from __future__ import annotations

import math
from typing import Any

from engine.optimizer.config import (
    LR_DECAY_STYLES,
    WD_INCR_STYLES,
    WSD_DECAY_STYLES,
    OptimizerConfig,
)


class OptimizerParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of an optimizer's param groups at every step.

    Args:
        optimizer: anything with ``param_groups`` (a torch optimizer or our wrappers).
        init_lr: learning rate at step 0 of the warm-up.
        max_lr: peak learning rate, reached at ``warmup_steps``.
        min_lr: floor of the decay.
        warmup_steps / decay_steps / wsd_decay_steps: spans in iterations or samples.
        start_wd / end_wd / wd_incr_steps / wd_incr_style: the weight-decay schedule.
    """

    def __init__(
        self,
        optimizer: Any,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int,
        decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str = "constant",
        wsd_decay_steps: int | None = None,
        lr_wsd_decay_style: str = "exponential",
    ):
        if decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {decay_style!r} is not one of {LR_DECAY_STYLES}")
        if lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(
                f"--lr-wsd-decay-style {lr_wsd_decay_style!r} is not one of {WSD_DECAY_STYLES}"
            )
        if wd_incr_style not in WD_INCR_STYLES:
            raise ValueError(
                f"--weight-decay-incr-style {wd_incr_style!r} is not one of {WD_INCR_STYLES}"
            )
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= --min-lr ({min_lr}) <= --lr ({max_lr})")
        if decay_steps <= 0 or warmup_steps < 0 or warmup_steps >= decay_steps:
            raise ValueError(
                f"need 0 <= warm-up steps ({warmup_steps}) < decay steps ({decay_steps}): "
                "check --lr-warmup-iters/--lr-warmup-samples and --lr-decay-iters/samples"
            )
        if decay_style == "WSD" and not wsd_decay_steps:
            raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or -samples)")
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = init_lr, max_lr, min_lr
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.decay_style = decay_style
        self.wsd_decay_steps, self.lr_wsd_decay_style = wsd_decay_steps, lr_wsd_decay_style
        self.start_wd, self.end_wd = start_wd, end_wd
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.num_steps = 0
        self.step(0)

    def get_lr(self) -> float:
        """The learning rate at ``num_steps``."""
        n, warmup = self.num_steps, self.warmup_steps
        if warmup > 0 and n <= warmup:
            return self.init_lr + (self.max_lr - self.init_lr) * n / warmup
        if self.decay_style == "constant":
            return self.max_lr
        if self.decay_style == "inverse-square-root":
            lr = self.max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1))
            return max(self.min_lr, lr)
        if n > self.decay_steps:
            return self.min_lr
        ratio = (n - warmup) / (self.decay_steps - warmup)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD
            wsd_decay_steps = self.wsd_decay_steps
            assert wsd_decay_steps is not None, "WSD is only built with wsd_decay_steps"
            anneal_start = self.decay_steps - wsd_decay_steps
            if n <= anneal_start:
                coeff = 1.0
            else:
                q = (n - anneal_start) / wsd_decay_steps
                coeff = {
                    "exponential": lambda: 2.0 * 0.5**q - 1.0,
                    "linear": lambda: 1.0 - q,
                    "cosine": lambda: 0.5 * (math.cos(math.pi * q) + 1.0),
                    "minus_sqrt": lambda: 1.0 - math.sqrt(q),
                }[self.lr_wsd_decay_style]()
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def get_wd(self) -> float:
        """The weight decay at ``num_steps``."""
        if self.wd_incr_style == "constant" or self.num_steps > self.wd_incr_steps:
            return self.end_wd
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:  # cosine: slow start, slow finish
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def step(self, increment: int = 1) -> None:
        """Advance by ``increment`` (1 iteration, or the global batch in samples) and apply."""
        self.num_steps += increment
        lr, wd = self.get_lr(), self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the schedule, so a resumed run continues exactly."""
        keys = (
            "init_lr", "max_lr", "min_lr", "warmup_steps", "decay_steps", "decay_style",
            "wsd_decay_steps", "lr_wsd_decay_style", "start_wd", "end_wd", "wd_incr_steps",
            "wd_incr_style", "num_steps",
        )  # fmt: skip
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved schedule (the checkpoint's values win over the constructor's)."""
        for key, value in state.items():
            setattr(self, key, value)
        self.step(0)


def build_lr_scheduler(
    optimizer: Any,
    config: OptimizerConfig,
    train_iters: int | None = None,
    train_samples: int | None = None,
) -> OptimizerParamScheduler:
    """The schedule of ``config``, counted in iterations (``train_iters``) or samples.

    As in Megatron, counting by samples is chosen by giving ``train_samples``; the caller then
    calls ``step(global_batch_size)`` every iteration. Decay spans default to the whole run.
    """
    if (train_iters is None) == (train_samples is None):
        raise ValueError("give exactly one of --train-iters and --train-samples")
    if train_iters is not None:
        decay = config.lr_decay_iters or train_iters
        warmup, wsd = config.lr_warmup_iters, config.lr_wsd_decay_iters
    else:
        assert train_samples is not None  # exactly one of the two, checked above
        decay = config.lr_decay_samples or train_samples
        warmup, wsd = config.lr_warmup_samples, config.lr_wsd_decay_samples
    if config.lr_warmup_fraction is not None:
        warmup = int(config.lr_warmup_fraction * decay)
    start_wd = (
        config.weight_decay if config.start_weight_decay is None else config.start_weight_decay
    )
    end_wd = config.weight_decay if config.end_weight_decay is None else config.end_weight_decay
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        warmup_steps=warmup,
        decay_steps=decay,
        decay_style=config.lr_decay_style,
        start_wd=start_wd,
        end_wd=end_wd,
        wd_incr_steps=decay,
        wd_incr_style=config.weight_decay_incr_style,
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=config.lr_wsd_decay_style,
    )
