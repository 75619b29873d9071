"""Learning-rate / weight-decay schedules against their closed forms, exact resume, and the
dynamic loss scaler's state machine (single process, no process group)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.optimizer import DynamicGradScaler, OptimizerParamScheduler, build_lr_scheduler
from engine.optimizer.config import OptimizerConfig

MAX_LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-5, 10, 100
SAMPLED = [0, 1, 5, 10, 11, 37, 50, 64, 89, 99, 100, 101, 150]


def _torch_optimizer() -> torch.optim.Optimizer:
    weight, bias = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    return torch.optim.AdamW(
        [{"params": [weight], "wd_mult": 1.0}, {"params": [bias], "wd_mult": 0.0}], lr=1.0
    )


def _scheduler(style: str, **kwargs) -> OptimizerParamScheduler:
    args = dict(
        init_lr=0.0, max_lr=MAX_LR, min_lr=MIN_LR, warmup_steps=WARMUP, decay_steps=DECAY,
        decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=DECAY,
    )  # fmt: skip
    args.update(kwargs)
    return OptimizerParamScheduler(_torch_optimizer(), **args)


def _closed_form(style: str, n: int, wsd_style: str = "exponential", wsd_steps: int = 20) -> float:
    if n <= WARMUP:
        return MAX_LR * n / WARMUP
    if style == "constant":
        return MAX_LR
    if style == "inverse-square-root":
        return max(MIN_LR, MAX_LR * math.sqrt(WARMUP / n))
    if n > DECAY:
        return MIN_LR
    r = (n - WARMUP) / (DECAY - WARMUP)
    if style == "linear":
        return MIN_LR + (MAX_LR - MIN_LR) * (1 - r)
    if style == "cosine":
        return MIN_LR + (MAX_LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * r))
    start = DECAY - wsd_steps  # WSD
    if n <= start:
        return MAX_LR
    q = (n - start) / wsd_steps
    coeff = {
        "exponential": 2 * 0.5**q - 1,
        "linear": 1 - q,
        "cosine": 0.5 * (1 + math.cos(math.pi * q)),
        "minus_sqrt": 1 - math.sqrt(q),
    }[wsd_style]
    return MIN_LR + (MAX_LR - MIN_LR) * coeff


def _lr_at(scheduler: OptimizerParamScheduler, n: int) -> float:
    scheduler.step(n - scheduler.num_steps)
    return scheduler.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_lr_matches_closed_form(style):
    scheduler = _scheduler(style)
    for n in SAMPLED:
        assert _lr_at(scheduler, n) == pytest.approx(_closed_form(style, n), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("wsd_style", ["exponential", "linear", "cosine", "minus_sqrt"])
def test_wsd_matches_closed_form(wsd_style):
    scheduler = _scheduler("WSD", wsd_decay_steps=20, lr_wsd_decay_style=wsd_style)
    for n in SAMPLED:
        expected = _closed_form("WSD", n, wsd_style)
        assert _lr_at(scheduler, n) == pytest.approx(expected, rel=1e-12, abs=1e-15), n


def test_counting_by_samples_equals_counting_by_iterations():
    """With --train-samples the counter advances by the global batch; spans are in samples."""
    batch = 8
    config = OptimizerConfig(
        lr=MAX_LR, min_lr=MIN_LR, lr_decay_style="cosine", lr_warmup_samples=WARMUP * batch,
        lr_decay_samples=DECAY * batch, lr_warmup_iters=WARMUP, lr_decay_iters=DECAY,
    )  # fmt: skip
    by_samples = build_lr_scheduler(_torch_optimizer(), config, train_samples=200 * batch)
    by_iters = build_lr_scheduler(_torch_optimizer(), config, train_iters=200)
    for _ in range(120):
        by_samples.step(batch)
        by_iters.step(1)
        assert by_samples.get_lr() == pytest.approx(by_iters.get_lr(), rel=1e-12)
    assert by_samples.num_steps == 120 * batch


@pytest.mark.parametrize("incr_style", ["linear", "cosine"])
def test_weight_decay_schedule_and_no_decay_groups(incr_style):
    scheduler = _scheduler("linear", start_wd=0.0, end_wd=0.1, wd_incr_style=incr_style)
    for n in SAMPLED:
        scheduler.step(n - scheduler.num_steps)
        ratio = min(n / DECAY, 1.0)
        coeff = ratio if incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1)
        decayed, not_decayed = scheduler.optimizer.param_groups
        assert decayed["weight_decay"] == pytest.approx(0.1 * coeff, abs=1e-15)
        assert not_decayed["weight_decay"] == 0.0  # norms and biases: wd_mult 0


def test_state_dict_resumes_exactly():
    config = OptimizerConfig(lr=MAX_LR, min_lr=MIN_LR, lr_decay_style="cosine", lr_warmup_iters=7)
    original = build_lr_scheduler(_torch_optimizer(), config, train_iters=100)
    for _ in range(37):
        original.step(1)
    # The resumed run was started with other settings: the checkpoint's win.
    other = OptimizerConfig(lr=1.0, lr_decay_style="linear")
    resumed = build_lr_scheduler(_torch_optimizer(), other, train_iters=50)
    resumed.load_state_dict(original.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == original.optimizer.param_groups[0]["lr"]
    for _ in range(70):
        original.step(1)
        resumed.step(1)
        assert resumed.get_lr() == original.get_lr()
        assert resumed.get_wd() == original.get_wd()


def test_invalid_schedule_names_the_flag():
    with pytest.raises(ValueError, match="--lr-decay-style"):
        _scheduler("exponential")
    with pytest.raises(ValueError, match="--lr-wsd-decay-iters"):
        _scheduler("WSD")


def test_dynamic_loss_scale_hysteresis_backoff_and_growth():
    scaler = DynamicGradScaler(2.0**16, min_scale=1.0, growth_interval=3, hysteresis=2)
    scaler.update(found_inf=True)  # first overflow: tolerated (hysteresis 2)
    assert scaler.scale == 2.0**16
    scaler.update(found_inf=True)  # second: halve
    assert scaler.scale == 2.0**15
    scaler.update(found_inf=True)  # hysteresis is not restored until the scale grows again
    assert scaler.scale == 2.0**14
    for _ in range(3):
        scaler.update(found_inf=False)
    assert scaler.scale == 2.0**15  # three clean steps: doubled, hysteresis restored
    scaler.update(found_inf=True)
    assert scaler.scale == 2.0**15
    state = scaler.state_dict()
    restored = DynamicGradScaler(1.0)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    tiny = DynamicGradScaler(2.0, min_scale=1.0, hysteresis=1)
    for _ in range(3):
        tiny.update(found_inf=True)
    assert tiny.scale == 1.0  # never below --min-loss-scale
