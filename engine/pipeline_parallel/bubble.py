"""Equal-cost stand-in stages for measuring a schedule's bubble against the theory.

A `SleepStage` costs a fixed time in forward and in backward and computes next to nothing, so
several ranks sharing a few CPU cores measure the schedule, not the machine.
`run_sleep_schedule` runs one step of the current layout's schedule over such stages and
returns every pipeline rank's `ScheduleRecorder`.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.pipeline_parallel.schedules import get_forward_backward_func
from engine.pipeline_parallel.timeline import ScheduleRecorder


class _Sleep(torch.autograd.Function):
    """A copy of its input that sleeps a fixed time in forward and in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.backward_s)
        return grad, None, None


class SleepStageConfig:
    """The fields a schedule reads from a model chunk's ``config`` (as `ModelConfig` has)."""

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        self.sequence_parallel = False
        self.params_dtype = torch.float32


class SleepStage(nn.Module):
    """A pipeline stage of known cost: ``x * weight`` ``[s, b, h]`` plus a fixed sleep."""

    def __init__(self, hidden_size: int, forward_s: float, backward_s: float):
        super().__init__()
        self.config = SleepStageConfig(hidden_size)
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.forward_s, self.backward_s = forward_s, backward_s
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        self.input_tensor = input_tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[s, b, h]`` is used on the first stage; later stages read their input."""
        x = x if self.input_tensor is None else self.input_tensor
        return _Sleep.apply(x * self.weight, self.forward_s, self.backward_s)


def _sleep_forward_step(data_iterator, model: SleepStage):
    output = model(next(data_iterator))
    return output, lambda out: (out.mean(), out.detach().mean())


def run_sleep_schedule(
    num_microbatches: int, forward_s: float, backward_s: float, warmup_steps: int = 1
) -> list[ScheduleRecorder]:
    """One step of the current layout's schedule over sleep stages; all pipeline ranks'
    recorders, gathered on every rank.

    Each rank's stage costs ``forward_s`` / ``backward_s`` per microbatch in total: with v
    virtual chunks each chunk costs a v-th of it, as when a rank's layers are split into
    chunks. ``warmup_steps`` untimed steps first open the p2p connections.
    """
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    hidden, seq, micro_batch = 8, 4, 1
    chunks = [SleepStage(hidden, forward_s / v, backward_s / v) for _ in range(v)]
    # Warm-up steps sleep nothing: they only open the connections.
    warm_chunks = [SleepStage(hidden, 0.0, 0.0) for _ in range(v)]
    batch = torch.ones(seq, micro_batch, hidden)
    schedule = get_forward_backward_func()
    group = parallel_state.get_pipeline_model_parallel_group()
    for step in range(warmup_steps + 1):
        recorder = ScheduleRecorder(rank=parallel_state.get_pipeline_model_parallel_rank())
        iterators = [iter([batch] * num_microbatches) for _ in chunks]
        dist.barrier(group=group)  # start together: the bubble is measured from the first start
        schedule(
            _sleep_forward_step,
            iterators if v > 1 else iterators[0],
            chunks if step == warmup_steps else warm_chunks,
            num_microbatches,
            seq,
            micro_batch,
            recorder=recorder if step == warmup_steps else None,
        )
    recorders: list[dict] = [{}] * dist.get_world_size(group)  # every entry is replaced
    dist.all_gather_object(recorders, recorder.to_dict(), group=group)
    return [ScheduleRecorder.from_dict(r) for r in recorders]
