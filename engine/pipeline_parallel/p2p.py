"""Point-to-point communication between adjacent pipeline stages.

Activations travel forward (rank r -> r+1), their gradients backward (r+1 -> r). Every call
posts all its sends and receives at once with ``torch.distributed.batch_isend_irecv`` and
waits for them, so two neighbours that send to each other in the same step cannot deadlock.
Shapes are known up front and fixed for the run: receivers allocate their buffers without a
shape handshake.

A message (what one stage sends the next for one microbatch) is, by default, one tensor
``[s/tp if sequence parallel else s, micro_batch, hidden]``. A model may declare its own
(`declared_message`): a fixed list of tensors, each with its shape and dtype, the same for
every stage of the run (hidden states and a side input, token ids, a mask, ...). A
single-tensor message travels as a plain tensor through every function here; a message of
several tensors as a tuple, in the declared order. The gradient of a message has one entry per
tensor: floating-point tensors get their gradient back, and integer tensors (ids, a mask)
carry none: nothing is sent back for them, and their entry of a gradient tuple is None.

``batch_isend_irecv`` works on gloo as well as NCCL (checked on gloo with torch 2.13: gloo
posts the ops one by one, which is all the batching needs here), so there is one code path.

Ordering matters when both neighbours are the same rank (p = 2, or interleaving, where the
next rank of the last stage is the first): NCCL and gloo match messages between a pair of
ranks in posting order. Every call posts in the order send-next, recv-prev, send-prev,
recv-next: on each link the activation is posted before the gradient on both ends. Within
each of the four, the tensors of a message are posted in the declared order (the gradient's
floating-point tensors only), on both ends.

The next and previous ranks wrap around (the last stage's next rank is stage 0), which the
interleaved schedule uses to pass a microbatch from one model chunk to the next.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.pipeline_parallel.timeline import ScheduleRecorder
from engine.wrappers import unwrap

TensorSpec = tuple[tuple[int, ...], torch.dtype]
"""The shape and dtype of one tensor of a message."""

Activations = torch.Tensor | tuple[torch.Tensor, ...]
"""A message as a stage sends it and the next receives it: a plain tensor when the message has
one tensor, else a tuple in the declared order."""

Gradients = torch.Tensor | tuple[torch.Tensor | None, ...]
"""The gradient of a message: a plain tensor for a single-tensor message, else a tuple with
one entry per tensor of the message (None for an integer tensor, which carries no gradient)."""

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

    By default a message is one tensor: ``tensor_shape`` (``[s/tp if sequence parallel else
    s, micro_batch, hidden]``) in ``dtype``. A model's declared message (`P2PSpec.declared`)
    sets ``message``, every tensor's shape and dtype in order; ``tensor_shape`` and ``dtype``
    are then its first tensor's.
    """

    tensor_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    recorder: ScheduleRecorder | None = None
    """Records the time spent in each call (the schedule's communication wait)."""
    message: tuple[TensorSpec, ...] | None = None
    """The model's declared message (`declared_message`); None: the one tensor above."""

    @classmethod
    def declared(
        cls,
        message: Sequence[tuple[Sequence[int], torch.dtype]],
        device: torch.device,
        recorder: ScheduleRecorder | None = None,
    ) -> P2PSpec:
        """The spec of a declared message (checked: see `check_message`)."""
        tensors = check_message(message)
        return cls(tensors[0][0], tensors[0][1], device, recorder, tensors)

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        """Every tensor of a message, in order (one for the default message)."""
        if self.message is not None:
            return self.message
        return ((tuple(self.tensor_shape), self.dtype),)

    @property
    def single(self) -> bool:
        """A message of one tensor, which travels as a plain tensor (not a tuple)."""
        return len(self.tensors) == 1


def check_message(message: Sequence[tuple[Sequence[int], torch.dtype]]) -> tuple[TensorSpec, ...]:
    """A declared message as a tuple of ``(shape, dtype)``; ValueError when it is empty, an
    entry is not a shape of non-negative ints and a dtype, or no tensor is floating-point (the
    gradient flows back through the floating-point ones)."""
    if isinstance(message, (str, bytes)) or not isinstance(message, Sequence) or not message:
        raise ValueError(
            f"pipeline_message() must return a non-empty list of (shape, dtype), got {message!r}"
        )
    tensors = []
    for index, entry in enumerate(message):
        shape, dtype = entry if isinstance(entry, (tuple, list)) and len(entry) == 2 else (0, 0)
        if (
            not isinstance(dtype, torch.dtype)
            or not isinstance(shape, Sequence)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise ValueError(
                f"pipeline_message() entry {index} must be (shape, dtype), e.g. "
                f"((seq, batch, hidden), torch.float32), got {entry!r}"
            )
        tensors.append((tuple(shape), dtype))
    if not any(dtype.is_floating_point for _, dtype in tensors):
        raise ValueError(
            f"pipeline_message() declares {describe(tensors)}: at least one tensor must be "
            "floating-point (gradients flow back through those; integer tensors carry none)"
        )
    return tuple(tensors)


def declared_message(
    module: nn.Module, seq_length: int, micro_batch_size: int
) -> tuple[TensorSpec, ...] | None:
    """The message a model chunk declares with ``pipeline_message(seq_length,
    micro_batch_size)`` (looked up inside wrappers), checked; None when it declares none (the
    default message ``[s(/tp), b, h]``)."""
    declare = getattr(unwrap(module), "pipeline_message", None)
    if declare is None:
        return None
    return check_message(declare(seq_length, micro_batch_size))


def describe(tensors: Sequence[TensorSpec]) -> str:
    """``([16, 2, 64] float32, [2, 32] float32)``: a message for error messages."""
    parts = [f"[{', '.join(map(str, shape))}] {str(dtype).removeprefix('torch.')}"
             for shape, dtype in tensors]  # fmt: skip
    return f"({', '.join(parts)})"


def _shown(tensors: Sequence[object]) -> str:
    """What came, in `describe`'s form (anything that is not a tensor by its type)."""
    parts = [
        describe([(tuple(t.shape), t.dtype)])[1:-1] if isinstance(t, torch.Tensor)
        else type(t).__name__
        for t in tensors
    ]  # fmt: skip
    return f"({', '.join(parts)})"


def communicate(
    tensor_send_next: Activations | None,
    tensor_send_prev: Gradients | None,
    recv_prev: bool,
    recv_next: bool,
    spec: P2PSpec,
) -> tuple[Activations | None, Gradients | None]:
    """Send to / receive from the neighbouring stages in one batch.

    Args:
        tensor_send_next: activation message (`Activations`) for the next stage, or None.
        tensor_send_prev: its gradient (`Gradients`) for the previous stage, or None.
        recv_prev: receive an activation message from the previous stage.
        recv_next: receive a gradient from the next stage.
        spec: shapes, dtypes and device of every message; its recorder times this call.

    Returns:
        (activations from prev or None, gradient from next or None): plain tensors for a
        single-tensor message, tuples otherwise (None in a gradient for an integer tensor).
        Received floating-point activations require grad, so the stage's backward produces
        the gradient to send back.
    """
    # Checked before anything is posted: a wrong message raises here, on this rank alone.
    send_next = [] if tensor_send_next is None else _outgoing(tensor_send_next, spec)
    send_prev = [] if tensor_send_prev is None else _outgoing_gradients(tensor_send_prev, spec)
    group = parallel_state.get_pipeline_model_parallel_group()
    _ensure_ready(group)
    start = time.perf_counter()
    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
    prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
    recv_prev_buffers: list[torch.Tensor] = []
    recv_next_buffers: list[torch.Tensor | None] = []
    ops = []
    for tensor in send_next:
        ops.append(dist.P2POp(dist.isend, tensor, next_rank, group))
    if recv_prev:
        for shape, dtype in spec.tensors:
            buffer = torch.empty(
                shape, dtype=dtype, device=spec.device, requires_grad=dtype.is_floating_point
            )
            recv_prev_buffers.append(buffer)
            ops.append(dist.P2POp(dist.irecv, buffer, prev_rank, group))
    for tensor in send_prev:
        ops.append(dist.P2POp(dist.isend, tensor, prev_rank, group))
    if recv_next:
        for shape, dtype in spec.tensors:
            grad = None
            if dtype.is_floating_point:
                grad = torch.empty(shape, dtype=dtype, device=spec.device)
                ops.append(dist.P2POp(dist.irecv, grad, next_rank, group))
            recv_next_buffers.append(grad)
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    if spec.recorder is not None:
        spec.recorder.add_comm(start, time.perf_counter())
    activations: Activations | None = None
    gradients: Gradients | None = None
    if recv_prev:
        activations = recv_prev_buffers[0] if spec.single else tuple(recv_prev_buffers)
    if recv_next:
        gradients = recv_next_buffers[0] if spec.single else tuple(recv_next_buffers)
    return activations, gradients


def as_tuple(message: Activations | Gradients) -> tuple[torch.Tensor | None, ...]:
    """A message's tensors as a tuple (a plain tensor is a message of one)."""
    if isinstance(message, torch.Tensor):
        return (message,)
    if isinstance(message, (tuple, list)):
        return tuple(message)
    raise TypeError(
        f"a pipeline message is a tensor or a tuple of tensors, got {type(message).__name__}"
    )


def _outgoing(message: Activations, spec: P2PSpec) -> list[torch.Tensor]:
    """The tensors of an activation message to send, checked against the spec, contiguous."""
    tensors = as_tuple(message)
    if spec.message is None:
        if len(tensors) != 1 or tensors[0] is None:
            raise ValueError(
                f"pipeline stage output is {len(tensors)} tensors, but the schedule's message "
                f"is one tensor of shape {tuple(spec.tensor_shape)} ([seq(/tp), micro_batch, "
                "hidden]): a model that sends more declares them with "
                "pipeline_message(seq_length, micro_batch_size)"
            )
        return [_checked(tensors[0], spec)]
    got = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in tensors]
    if got != list(spec.message):
        raise ValueError(
            f"pipeline stage output is {len(tensors)} tensor(s) {_shown(tensors)}, but the "
            f"model declares its message (pipeline_message) as {len(spec.message)} tensor(s) "
            f"{describe(spec.message)}"
        )
    return [t.detach().contiguous() for t in tensors if t is not None]


def _outgoing_gradients(gradients: Gradients, spec: P2PSpec) -> list[torch.Tensor]:
    """The floating-point tensors of a gradient message to send, checked, contiguous."""
    grads = as_tuple(gradients)
    if spec.message is None:
        if len(grads) != 1 or grads[0] is None:
            raise ValueError(
                f"pipeline stage input gradient is {len(grads)} tensors, but the schedule's "
                f"message is one tensor of shape {tuple(spec.tensor_shape)}"
            )
        return [_checked(grads[0], spec)]
    if len(grads) != len(spec.message):
        raise ValueError(
            f"the gradient of a pipeline message has {len(grads)} entries, but the message "
            f"has {len(spec.message)} tensors {describe(spec.message)}"
        )
    out = []
    for index, (grad, (shape, dtype)) in enumerate(zip(grads, spec.message, strict=True)):
        if not dtype.is_floating_point:
            continue  # an integer tensor: no gradient travels back
        if grad is None or (tuple(grad.shape), grad.dtype) != (shape, dtype):
            came = "missing" if grad is None else _shown([grad])
            raise ValueError(
                f"the gradient of tensor {index} of the pipeline message is {came}, but the "
                f"model declares that tensor as {describe([(shape, dtype)])}"
            )
        out.append(grad.detach().contiguous())
    return out


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


@overload
def received(message: Activations | None) -> Activations: ...
@overload
def received(message: Gradients | None) -> Gradients: ...
def received(message: Gradients | None) -> Gradients:
    """What `communicate` received for a ``recv_prev`` / ``recv_next`` it was asked for (so
    never None)."""
    assert message is not None
    return message


def recv_forward(spec: P2PSpec) -> Activations:
    """Receive this microbatch's input activations from the previous stage."""
    return received(communicate(None, None, True, False, spec)[0])


def recv_backward(spec: P2PSpec) -> Gradients:
    """Receive the gradient of this stage's output from the next stage."""
    return received(communicate(None, None, False, True, spec)[1])


def send_forward(output: Activations, spec: P2PSpec) -> None:
    """Send this stage's output activations to the next stage."""
    communicate(output, None, False, False, spec)


def send_backward(input_grad: Gradients, spec: P2PSpec) -> None:
    """Send the gradient of this stage's input to the previous stage."""
    communicate(None, input_grad, False, False, spec)


def send_forward_recv_backward(output: Activations, spec: P2PSpec) -> Gradients:
    """Send an output forward and receive the gradient of an (earlier) output, in one batch."""
    return received(communicate(output, None, False, True, spec)[1])


def send_backward_recv_forward(input_grad: Gradients, spec: P2PSpec) -> Activations:
    """Send an input gradient backward and receive the next microbatch's input, in one batch."""
    return received(communicate(None, input_grad, True, False, spec)[0])
