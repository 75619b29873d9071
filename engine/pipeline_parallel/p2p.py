"""Point-to-point communication between adjacent pipeline stages.

Activations travel forward (rank r -> r+1), their gradients backward (r+1 -> r). Every call
posts all its sends and receives at once with ``torch.distributed.batch_isend_irecv`` and
waits for them, so two neighbours that send to each other in the same step cannot deadlock.
Shapes are known up front (``[s/tp if sequence parallel else s, micro_batch, hidden]``) and
fixed for the run: receivers allocate their buffer without a shape handshake.

``batch_isend_irecv`` works on gloo as well as NCCL (checked on gloo with torch 2.13: gloo
posts the ops one by one, which is all the batching needs here), so there is one code path.

Ordering matters when both neighbours are the same rank (p = 2, or interleaving, where the
next rank of the last stage is the first): NCCL and gloo match messages between a pair of
ranks in posting order. Every call posts in the order send-next, recv-prev, send-prev,
recv-next: on each link the activation is posted before the gradient on both ends.

The next and previous ranks wrap around (the last stage's next rank is stage 0), which the
interleaved schedule uses to pass a microbatch from one model chunk to the next.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine import parallel_state
from engine.pipeline_parallel.timeline import ScheduleRecorder

# Pipeline groups that have had their first collective (see `_ensure_ready`).
_READY_GROUPS: weakref.WeakSet[dist.ProcessGroup] = weakref.WeakSet()


def _ensure_ready(group: dist.ProcessGroup) -> None:
    """Run one barrier over the pipeline group before its first p2p batch.

    PyTorch requires every rank of a group to take part in the group's first collective call
    when that call is `batch_isend_irecv` on NCCL (the communicator is created then); the
    schedules' first batches involve only pairs of ranks. Every pipeline rank reaches its first
    p2p call without waiting on another pipeline rank, so a barrier there cannot deadlock. It
    runs on gloo too (harmless, once per group), so this path is the tested one.
    """
    if group not in _READY_GROUPS:
        dist.barrier(group=group)
        _READY_GROUPS.add(group)


@dataclass
class P2PSpec:
    """What every message of one schedule run looks like, fixed up front (no handshakes).

    ``tensor_shape`` is ``[s/tp if sequence parallel else s, micro_batch, hidden]``.
    """

    tensor_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    recorder: ScheduleRecorder | None = None
    """Records the time spent in each call (the schedule's communication wait)."""


def communicate(
    tensor_send_next: torch.Tensor | None,
    tensor_send_prev: torch.Tensor | None,
    recv_prev: bool,
    recv_next: bool,
    spec: P2PSpec,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send to / receive from the neighbouring stages in one batch.

    Args:
        tensor_send_next: activation ``spec.tensor_shape`` for the next stage, or None.
        tensor_send_prev: gradient ``spec.tensor_shape`` for the previous stage, or None.
        recv_prev: receive an activation from the previous stage.
        recv_next: receive a gradient from the next stage.
        spec: shape, dtype and device of every message; its recorder times this call.

    Returns:
        (activation from prev or None, gradient from next or None). A received activation
        requires grad, so the stage's backward produces the gradient to send back.
    """
    group = parallel_state.get_pipeline_model_parallel_group()
    _ensure_ready(group)
    start = time.perf_counter()
    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
    prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
    recv_prev_buffer = recv_next_buffer = None
    ops = []
    if tensor_send_next is not None:
        ops.append(dist.P2POp(dist.isend, _checked(tensor_send_next, spec), next_rank, group))
    if recv_prev:
        recv_prev_buffer = torch.empty(
            spec.tensor_shape, dtype=spec.dtype, device=spec.device, requires_grad=True
        )
        ops.append(dist.P2POp(dist.irecv, recv_prev_buffer, prev_rank, group))
    if tensor_send_prev is not None:
        ops.append(dist.P2POp(dist.isend, _checked(tensor_send_prev, spec), prev_rank, group))
    if recv_next:
        recv_next_buffer = torch.empty(spec.tensor_shape, dtype=spec.dtype, device=spec.device)
        ops.append(dist.P2POp(dist.irecv, recv_next_buffer, next_rank, group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    if spec.recorder is not None:
        spec.recorder.add_comm(start, time.perf_counter())
    return recv_prev_buffer, recv_next_buffer


def _checked(tensor: torch.Tensor, spec: P2PSpec) -> torch.Tensor:
    """The tensor to send, contiguous; a shape or dtype other than the agreed one is a bug
    upstream (the receiver's buffer would silently get the wrong bytes), so say so."""
    if tuple(tensor.shape) != tuple(spec.tensor_shape):
        raise ValueError(
            f"pipeline stage output has shape {tuple(tensor.shape)}, but the schedule's "
            f"tensor shape is {tuple(spec.tensor_shape)} ([seq(/tp), micro_batch, hidden]): check "
            "--seq-length, --micro-batch-size and --sequence-parallel"
        )
    if tensor.dtype != spec.dtype:
        raise ValueError(
            f"pipeline stage output is {tensor.dtype}, but the schedule's p2p dtype is "
            f"{spec.dtype}: set the model config's pipeline_dtype to the activations' dtype"
        )
    return tensor.detach().contiguous()


# Named wrappers, as the schedules read them ---------------------------------------------------


def received(tensor: torch.Tensor | None) -> torch.Tensor:
    """What `communicate` received for a ``recv_prev`` / ``recv_next`` it was asked for (so
    never None)."""
    assert tensor is not None
    return tensor


def recv_forward(spec: P2PSpec) -> torch.Tensor:
    """Receive this microbatch's input activation from the previous stage."""
    return received(communicate(None, None, True, False, spec)[0])


def recv_backward(spec: P2PSpec) -> torch.Tensor:
    """Receive the gradient of this stage's output from the next stage."""
    return received(communicate(None, None, False, True, spec)[1])


def send_forward(output: torch.Tensor, spec: P2PSpec) -> None:
    """Send this stage's output activation to the next stage."""
    communicate(output, None, False, False, spec)


def send_backward(input_grad: torch.Tensor, spec: P2PSpec) -> None:
    """Send the gradient of this stage's input to the previous stage."""
    communicate(None, input_grad, False, False, spec)


def send_forward_recv_backward(output: torch.Tensor, spec: P2PSpec) -> torch.Tensor:
    """Send an output forward and receive the gradient of an (earlier) output, in one batch."""
    return received(communicate(output, None, False, True, spec)[1])


def send_backward_recv_forward(input_grad: torch.Tensor, spec: P2PSpec) -> torch.Tensor:
    """Send an input gradient backward and receive the next microbatch's input, in one batch."""
    return received(communicate(None, input_grad, True, False, spec)[0])
