"""AdamW, mixed precision, clipping and the learning-rate schedule: `OptimizerConfig`, the
configuration of `engine.optimizer` (Megatron-LM's flags), with the schedules' choices."""

from __future__ import annotations

from dataclasses import dataclass

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimizerConfig:
    """AdamW, mixed precision, clipping and the learning-rate schedule (Megatron's flags)."""

    lr: float = 3e-4
    """Peak learning rate (``--lr``)."""
    min_lr: float = 0.0
    """Floor the schedule decays to (``--min-lr``)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (``--weight-decay``); never applied to norms and biases."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip to this global L2 norm (``--clip-grad``); 0 disables clipping."""
    bf16: bool = False
    """bf16 parameters and activations, fp32 main parameters (``--bf16``)."""
    fp16: bool = False
    """fp16 parameters with dynamic loss scaling (``--fp16``)."""
    loss_scale: float | None = None
    """A constant loss scale for fp16 (``--loss-scale``); None means dynamic."""
    initial_loss_scale: float = 2.0**32
    """Dynamic scaling's first scale (``--initial-loss-scale``)."""
    min_loss_scale: float = 1.0
    """Dynamic scaling never goes below this (``--min-loss-scale``)."""
    loss_scale_window: int = 1000
    """Steps without inf/nan before the scale doubles (``--loss-scale-window``)."""
    hysteresis: int = 2
    """Overflowing steps tolerated before the scale is lowered (``--hysteresis``)."""
    lr_decay_style: str = "linear"
    """constant, linear, cosine, inverse-square-root or WSD (``--lr-decay-style``)."""
    lr_warmup_iters: int = 0
    lr_warmup_samples: int = 0
    lr_warmup_fraction: float | None = None
    """Warm-up as a fraction of the decay span (``--lr-warmup-fraction``)."""
    lr_decay_iters: int | None = None
    lr_decay_samples: int | None = None
    lr_wsd_decay_style: str = "exponential"
    """WSD's final decay: exponential, linear, cosine or minus_sqrt (``--lr-wsd-decay-style``)."""
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_samples: int | None = None
    start_weight_decay: float | None = None
    """Weight decay schedule start (``--start-weight-decay``); None = ``weight_decay``."""
    end_weight_decay: float | None = None
    weight_decay_incr_style: str = "constant"
    """constant, linear or cosine (``--weight-decay-incr-style``)."""

    def errors(self, train_iters: int | None, train_samples: int | None) -> list[str]:
        """What is wrong with these options for a run of ``train_iters`` iterations or
        ``train_samples`` samples (the schedule's spans are counted in the run's unit)."""
        errors = []
        if self.fp16 and self.bf16:
            errors.append("--fp16 and --bf16 are exclusive: choose one")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            errors.append(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}) and --lr > 0")
        for flag, value, allowed in (
            ("--lr-decay-style", self.lr_decay_style, LR_DECAY_STYLES),
            ("--lr-wsd-decay-style", self.lr_wsd_decay_style, WSD_DECAY_STYLES),
            ("--weight-decay-incr-style", self.weight_decay_incr_style, WD_INCR_STYLES),
        ):
            if value not in allowed:
                errors.append(f"{flag} {value!r} is not one of {', '.join(allowed)}")
        # As in Megatron, spans are counted in the unit of the run length.
        iter_flags = {
            "--lr-warmup-iters": self.lr_warmup_iters,
            "--lr-decay-iters": self.lr_decay_iters,
            "--lr-wsd-decay-iters": self.lr_wsd_decay_iters,
        }
        sample_flags = {
            "--lr-warmup-samples": self.lr_warmup_samples,
            "--lr-decay-samples": self.lr_decay_samples,
            "--lr-wsd-decay-samples": self.lr_wsd_decay_samples,
        }
        if train_samples is not None:
            wrong, unit = iter_flags, "--train-samples"
        elif train_iters is not None:
            wrong, unit = sample_flags, "--train-iters"
        else:
            wrong, unit = {}, ""
        errors += [
            f"{flag} ({value}) does not apply with {unit}: use the "
            f"{'samples' if unit == '--train-samples' else 'iters'} variant"
            for flag, value in wrong.items()
            if value
        ]
        if self.lr_warmup_fraction is not None and (self.lr_warmup_iters or self.lr_warmup_samples):
            errors.append(
                f"--lr-warmup-fraction ({self.lr_warmup_fraction}) and --lr-warmup-iters "
                f"({self.lr_warmup_iters}) / --lr-warmup-samples ({self.lr_warmup_samples}) are "
                "exclusive"
            )
        if self.lr_decay_style == "WSD" and not (
            self.lr_wsd_decay_iters or self.lr_wsd_decay_samples
        ):
            errors.append("--lr-decay-style WSD needs --lr-wsd-decay-iters (or -samples)")
        errors += self._range_errors()
        if self.clip_grad < 0:
            errors.append(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        return errors

    def _range_errors(self) -> list[str]:
        """Adam's coefficients, weight decay and the loss scaler's settings in their ranges."""
        errors = [
            f"{flag} must be in [0, 1), got {value}"
            for flag, value in (
                ("--adam-beta1", self.adam_beta1),
                ("--adam-beta2", self.adam_beta2),
            )
            if not 0 <= value < 1
        ]
        if self.adam_eps <= 0:
            errors.append(f"--adam-eps must be positive, got {self.adam_eps}")
        decays = {
            "--weight-decay": self.weight_decay,
            "--start-weight-decay": self.start_weight_decay,
            "--end-weight-decay": self.end_weight_decay,
        }
        errors += [
            f"{flag} must be >= 0, got {value}"
            for flag, value in decays.items()
            if value is not None and value < 0
        ]
        if self.loss_scale is not None and self.loss_scale <= 0:
            errors.append(f"--loss-scale must be positive, got {self.loss_scale}")
        elif self.fp16 and self.loss_scale is not None and self.loss_scale < 1:
            errors.append(
                f"--loss-scale {self.loss_scale} with --fp16 scales the gradients down toward "
                "fp16 underflow (they would become 0): use at least 1, or leave --loss-scale out "
                "for dynamic scaling"
            )
        if self.min_loss_scale <= 0 or self.initial_loss_scale < self.min_loss_scale:
            errors.append(
                f"need 0 < --min-loss-scale ({self.min_loss_scale}) <= --initial-loss-scale "
                f"({self.initial_loss_scale})"
            )
        for flag, count in (
            ("--loss-scale-window", self.loss_scale_window),
            ("--hysteresis", self.hysteresis),
        ):
            if count < 1:
                errors.append(f"{flag} must be at least 1, got {count}")
        return errors
