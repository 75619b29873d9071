"""What the trainer measures and how it reports it: FLOPs and MFU, memory, the per-iteration
console line, and the scalar sinks that record it (`ScalarSink`: TensorBoard here, Weights &
Biases in `engine.training.wandb_writer`).

The console line starts exactly as DESIGN.md fixes it (scripts and tests parse it)::

    iteration 20/300 | loss 5.123456E+00 | lr 3.000E-04 | grad norm 1.234 | tokens/s 1234 | ...

followed by step time, TFLOP/s and MFU per device, the loss scale, skipped steps, memory and
an ETA. Model FLOPs per token are `engine.models.flops.flops_per_token`'s ``6·N_matmul + 12·L·h·s``
(forward + backward of every matmul weight, plus attention scores and values; the input
embedding is a lookup, not a matmul): 42.9 GFLOP/token for the 7B preset at s = 2048.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.models.config import ModelConfig
from engine.models.flops import flops_per_token

# Dense bf16 peak TFLOP/s by device name (substring match, most specific first); MFU is
# reported against these unless --peak-tflops says otherwise.
_PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),  # fp16 tensor cores (no bf16)
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def detect_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when it is a known accelerator; None otherwise (CPUs
    vary too much to guess: pass ``--peak-tflops``)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def memory_gb(device: torch.device) -> tuple[str, float]:
    """(what, GB): the peak allocated accelerator memory, or this process's peak RSS."""
    if device.type == "cuda":
        return "mem", torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return "rss", peak * (1 if sys.platform == "darwin" else 1024) / 1e9


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


@dataclass
class IterationLog:
    """Everything one log line reports (averaged over the log interval where it applies)."""

    iteration: int
    train_iters: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    step_time_s: float
    tflops_per_device: float
    mfu: float | None
    loss_scale: float
    skipped_steps: int
    nan_iterations: int
    memory: tuple[str, float]
    eta_s: float
    extra: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """The console line; its first five fields are fixed by DESIGN.md."""
        norm = "n/a" if self.grad_norm is None else f"{self.grad_norm:.3f}"
        mfu = "n/a" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        what, gb = self.memory
        return (
            f"iteration {self.iteration}/{self.train_iters} | loss {self.loss:.6E} | "
            f"lr {self.lr:.3E} | grad norm {norm} | tokens/s {self.tokens_per_s:.0f} | "
            f"step time {self.step_time_s * 1000:.0f} ms | TFLOP/s/device "
            f"{self.tflops_per_device:.3g} | MFU {mfu} | loss scale {self.loss_scale:g} | "
            f"skipped {self.skipped_steps} | nan {self.nan_iterations} | {what} {gb:.2f} GB | "
            f"ETA {_eta(self.eta_s)}"
        )

    def scalars(self) -> dict[str, float]:
        """The same numbers under the tags every `ScalarSink` receives."""
        out = {
            "train/loss": self.loss,
            "train/lr": self.lr,
            "train/tokens_per_s": self.tokens_per_s,
            "train/step_time_s": self.step_time_s,
            "train/tflops_per_device": self.tflops_per_device,
            "train/loss_scale": self.loss_scale,
            "train/skipped_steps": float(self.skipped_steps),
            "train/nan_iterations": float(self.nan_iterations),
            f"memory/{self.memory[0]}_gb": self.memory[1],
            **self.extra,
        }
        if self.grad_norm is not None:
            out["train/grad_norm"] = self.grad_norm
        if self.mfu is not None:
            out["train/mfu"] = self.mfu
        return out


class IntervalMeter:
    """Accumulates iterations between two log lines and turns them into an `IterationLog`.

    Args:
        config: the model (for FLOPs per token).
        seq_length: tokens per sample.
        world_size: devices in the job (throughput is divided by it for "per device").
        peak_tflops: the device peak for MFU (None: MFU not reported).
    """

    def __init__(
        self, config: ModelConfig, seq_length: int, world_size: int, peak_tflops: float | None
    ):
        self.flops_per_token = flops_per_token(config, seq_length)
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.tokens = 0
        self.seconds = 0.0
        self.iterations = 0

    def add(self, loss: float, grad_norm: float | None, tokens: int, seconds: float) -> None:
        """One iteration: its loss (skipped if non-finite), grad norm, tokens and time."""
        if math.isfinite(loss):
            self.losses.append(loss)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.norms.append(grad_norm)
        self.tokens += tokens
        self.seconds += seconds
        self.iterations += 1

    def summary(self, iteration: int, train_iters: int, **fields) -> IterationLog:
        """An `IterationLog` of the interval; ``fields`` give lr, loss_scale, skipped_steps,
        nan_iterations, memory."""
        seconds = max(self.seconds, 1e-9)
        tokens_per_s = self.tokens / seconds
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        step_time = seconds / max(self.iterations, 1)
        loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        norm = sum(self.norms) / len(self.norms) if self.norms else None
        mfu = None if not self.peak_tflops else tflops / self.peak_tflops
        eta = step_time * (train_iters - iteration)
        return IterationLog(
            iteration=iteration, train_iters=train_iters, loss=loss, grad_norm=norm,
            tokens_per_s=tokens_per_s, step_time_s=step_time, tflops_per_device=tflops, mfu=mfu,
            eta_s=eta, **fields,
        )  # fmt: skip


class ScalarSink(Protocol):
    """Where one rank records the logged scalars (``{"train/loss": ..., ...}`` by iteration):
    `TensorBoardWriter`, `engine.training.wandb_writer.WandbWriter`."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Record ``values`` at iteration ``step``."""

    def close(self) -> None:
        """Flush and release; the sink takes nothing after this."""


class TensorBoardWriter:
    """TensorBoard scalars (``--tensorboard-dir``), written by one rank (a `ScalarSink`).

    Raises ImportError with the install command when the ``tensorboard`` package is missing
    (``torch.utils.tensorboard`` needs it), rather than silently writing nothing.
    """

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch raises it when tensorboard is absent
            raise ImportError(
                f"--tensorboard-dir {log_dir} needs the tensorboard package: "
                "pip install tensorboard (or pip install -e '.[test]')"
            ) from error
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
