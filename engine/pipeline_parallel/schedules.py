"""Forward-backward schedules over microbatches: none, 1F1B, and interleaved 1F1B.

All three share one call signature (see `get_forward_backward_func`)::

    losses = forward_backward_func(
        forward_step_func=forward_step,   # (data_iterator, model_chunk) -> (output, loss_func)
        data_iterator=it,                 # or one iterator per model chunk when interleaving
        model=chunks,                     # list of model chunks (one unless interleaving)
        num_microbatches=m, seq_length=s, micro_batch_size=b,
    )

``loss_func(output)`` returns ``(loss, logged)``: a scalar to back-propagate and whatever the
caller wants back for this microbatch; the schedule returns the ``logged`` values, one per
microbatch in order, on the last pipeline stage (an empty list elsewhere). The loss is
divided by ``num_microbatches`` before backward, so gradients are those of the mean loss.

Point-to-point messages are fixed for the run. By default one tensor
``[s/tp if sequence parallel else s, b, h]`` in the chunk's ``config.pipeline_dtype`` (if set,
else ``config.params_dtype``), with ``s`` this rank's ``seq_length / cp`` tokens under context
parallelism; a chunk with a ``pipeline_message(seq_length, micro_batch_size)`` method (given
that local length) declares its own, a list of ``(shape, dtype)`` (see
`engine.pipeline_parallel.p2p`): the stage's output is then a tuple of tensors in that order,
and ``set_input_tensor`` receives such a tuple (a message of one tensor stays a plain tensor).
Once a stage's output has been sent downstream only its autograd graph is needed, so its data
is freed (`deallocate_output_tensor`) and the backward is started with `custom_backward`:
activation memory then follows the schedule's bound (1F1B: at most ``p - r`` microbatches in
flight on rank r).

Gradient-sync hooks follow Megatron-LM's config names, for a data-parallel wrapper:
``no_sync_func()`` is a context manager that suspends gradient reduction (or a list, one per
chunk); it is held for every backward except the last microbatch's of each chunk. After that
backward ``grad_sync_func(params)`` (or one per chunk) may start the chunk's reduction, and
``finalize_model_grads_func(model)`` runs once at the end. ``grad_scale_func(loss)`` scales
the loss for mixed precision.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any, Protocol, cast

import torch
from torch import nn

from engine import parallel_state
from engine.pipeline_parallel import p2p
from engine.pipeline_parallel.activations import (
    custom_backward,
    deallocate_message,
)
from engine.pipeline_parallel.p2p import Activations, Gradients, P2PSpec
from engine.pipeline_parallel.timeline import ScheduleRecorder
from engine.wrappers import unwrap

ForwardStepFunc = Callable[[Any, nn.Module], tuple[Any, Callable[[Any], Any]]]
"""``(data_iterator, model_chunk) -> (output, loss_func)``: ``output`` is the stage's message
(a tensor, or a tuple of them for a declared message) off the last stage, and what
``loss_func`` reads on it."""
OneOrPerChunk = Callable | list[Callable] | None


def get_forward_backward_func() -> Callable[..., list[Any]]:
    """The schedule for the current layout: no pipelining, 1F1B, or interleaved 1F1B."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return forward_backward_no_pipelining
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


# What every schedule does per microbatch ------------------------------------------------------


class _ChunkConfig(Protocol):
    """What the schedules read of a model chunk's ``config`` (a model config)."""

    sequence_parallel: bool
    hidden_size: int
    params_dtype: torch.dtype


def _input_grad(input_grad: Gradients | None) -> Gradients:
    """The gradient of a received activation message, to send back to the stage it came
    from."""
    if input_grad is None:
        raise RuntimeError(
            "a pipeline stage's input got no gradient: the stage's output must depend on it"
        )
    return input_grad


def _per_chunk(value: Any, num_chunks: int, what: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != num_chunks:
            raise ValueError(f"{what}: got a list of {len(value)} for {num_chunks} model chunks")
        return value
    return [value] * num_chunks


class _Step:
    """State shared by the microbatches of one schedule run: the forward and backward of one
    microbatch on one chunk, the gradient-sync hooks, the collected losses and the recorder."""

    def __init__(
        self,
        forward_step_func: ForwardStepFunc,
        data_iterators: list[Iterator | None],
        model: list[nn.Module],
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        forward_only: bool,
        no_sync_func: OneOrPerChunk,
        grad_sync_func: OneOrPerChunk,
        grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None,
        recorder: ScheduleRecorder | None,
    ):
        if num_microbatches < 1:
            raise ValueError(f"--num-microbatches must be at least 1, got {num_microbatches}")
        self.forward_step_func, self.data_iterators = forward_step_func, data_iterators
        self.model, self.num_microbatches = model, num_microbatches
        self.forward_only, self.grad_scale_func = forward_only, grad_scale_func
        self.recorder = recorder if recorder is not None else ScheduleRecorder()
        self.recorder.pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.recorder.num_microbatches, self.recorder.virtual_size = num_microbatches, len(model)
        self.no_sync_funcs = [f for f in _per_chunk(no_sync_func, len(model), "no_sync_func") if f]
        self.grad_sync_funcs = _per_chunk(grad_sync_func, len(model), "grad_sync_func")
        self.losses: list[Any] = []
        self._no_sync: ExitStack | None = None

        self.spec = _message_spec(model, seq_length, micro_batch_size, recorder)
        if not forward_only:
            self.disable_grad_sync()

    def disable_grad_sync(self) -> None:
        if self._no_sync is None and self.no_sync_funcs:
            self._no_sync = ExitStack()
            for no_sync in self.no_sync_funcs:
                self._no_sync.enter_context(no_sync())

    def enable_grad_sync(self) -> None:
        if self._no_sync is not None:
            self._no_sync.close()
            self._no_sync = None

    def forward(
        self, chunk: int, microbatch: int, input_tensor: Activations | None, is_last: bool
    ) -> Activations:
        """Run one microbatch through one chunk; on the last stage return its scaled loss.

        ``input_tensor`` comes from the previous stage (None on the first): ``[s(/tp), b, h]``,
        or the tuple of a declared message; it is handed to ``set_input_tensor`` as it is.
        """
        if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
            parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)
        with self.recorder.span("forward", microbatch, chunk):
            set_input_tensor = getattr(unwrap(self.model[chunk]), "set_input_tensor", None)
            if set_input_tensor is not None:
                set_input_tensor(input_tensor)
            elif input_tensor is not None:
                raise TypeError("a pipeline model chunk needs a set_input_tensor(tensor) method")
            output, loss_func = self.forward_step_func(
                self.data_iterators[chunk], self.model[chunk]
            )
            if is_last:
                loss, logged = loss_func(output)
                self.losses.append(logged)
                output = loss / self.num_microbatches
        if not self.forward_only:
            self.recorder.activation_stored()
        return output

    def backward(
        self,
        chunk: int,
        microbatch: int,
        input_tensor: Activations | None,
        output: Activations,
        output_grad: Gradients | None,
    ) -> Gradients | None:
        """Back-propagate one microbatch through one chunk; return the gradient of its input.

        ``output_grad`` is None on the last stage, where ``output`` is the scalar loss. For a
        message of several tensors the backward runs from every output tensor with its
        gradient, and the input's gradient is a tuple: None for an integer tensor, zeros for a
        floating-point tensor the output does not depend on (None when no tensor got one).
        """
        last_for_chunk = microbatch == self.num_microbatches - 1
        if last_for_chunk:
            # Reduce gradients (through the data-parallel wrapper's hooks) only during the
            # last microbatch's backward, once every microbatch has accumulated into them.
            self.enable_grad_sync()
        with self.recorder.span("backward", microbatch, chunk):
            if output_grad is None:
                loss = cast(torch.Tensor, output)
                if self.grad_scale_func is not None:
                    loss = self.grad_scale_func(loss)
                torch.autograd.backward(loss)
            else:
                custom_backward(output, output_grad)
        self.recorder.activation_freed()
        if last_for_chunk:
            self.disable_grad_sync()
            if self.grad_sync_funcs[chunk] is not None:
                self.grad_sync_funcs[chunk](self.model[chunk].parameters())
        return _gradient_of(input_tensor)

    def finish(self, finalize_model_grads_func: Callable[[list[nn.Module]], None] | None) -> None:
        self.enable_grad_sync()
        if not self.forward_only and finalize_model_grads_func is not None:
            finalize_model_grads_func(self.model)


def _gradient_of(input_tensor: Activations | None) -> Gradients | None:
    """The gradient a backward left on a received message (see `_Step.backward`)."""
    if input_tensor is None or isinstance(input_tensor, torch.Tensor):
        return None if input_tensor is None else input_tensor.grad
    floating = [t for t in input_tensor if t.is_floating_point()]
    if all(t.grad is None for t in floating):
        return None
    return tuple(
        None if not t.is_floating_point() else t.grad if t.grad is not None else torch.zeros_like(t)
        for t in input_tensor
    )


def _message_spec(
    model: list[nn.Module],
    seq_length: int,
    micro_batch_size: int,
    recorder: ScheduleRecorder | None,
) -> P2PSpec:
    """The run's messages: what the chunks declare (`p2p.declared_message`; every chunk the
    same), else one tensor ``[s(/tp), b, h]`` from the first chunk's config."""
    device = next(model[0].parameters()).device
    # Under context parallelism each rank's stages carry its s/cp tokens of the sequence.
    cp = 1
    if parallel_state.model_parallel_is_initialized():
        cp = parallel_state.get_context_parallel_world_size()
    if seq_length % cp != 0:
        raise ValueError(
            f"--seq-length ({seq_length}) must be divisible by --context-parallel-size ({cp})"
        )
    seq_length //= cp
    declared = [p2p.declared_message(chunk, seq_length, micro_batch_size) for chunk in model]
    if any(message != declared[0] for message in declared):
        shown = ["none (default)" if m is None else p2p.describe(m) for m in declared]
        raise ValueError(
            "every stage of a pipeline run sends the same message, but this rank's model "
            f"chunks declare (pipeline_message) {', '.join(shown)}"
        )
    if declared[0] is not None:
        return P2PSpec.declared(declared[0], device, recorder)
    config = cast(_ChunkConfig, unwrap(model[0]).config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config.sequence_parallel and seq_length % tp != 0:
        raise ValueError(
            f"--seq-length ({seq_length}) must be divisible by --tensor-model-parallel-size "
            f"({tp}) with --sequence-parallel"
        )
    seq = seq_length // tp if config.sequence_parallel else seq_length
    # Activations travel in Megatron's ``pipeline_dtype`` when the config has one (mixed
    # precision computes in bfloat16 over float32 parameters), else the parameters' dtype.
    dtype = getattr(config, "pipeline_dtype", None) or config.params_dtype
    return P2PSpec((seq, micro_batch_size, config.hidden_size), dtype, device, recorder)


def _check_single_chunk(model: list[nn.Module] | nn.Module, schedule: str) -> list[nn.Module]:
    model = model if isinstance(model, list) else [model]
    if len(model) != 1:
        raise ValueError(
            f"{schedule} runs one model chunk, got {len(model)}: use "
            "forward_backward_pipelining_with_interleaving for virtual pipeline stages"
        )
    return model


# Schedules ------------------------------------------------------------------------------------


def forward_backward_no_pipelining(
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator | list[Iterator],
    model: nn.Module | list[nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    *,
    no_sync_func: OneOrPerChunk = None,
    grad_sync_func: OneOrPerChunk = None,
    finalize_model_grads_func: Callable[[list[nn.Module]], None] | None = None,
    grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
    recorder: ScheduleRecorder | None = None,
) -> list[Any]:
    """Gradient accumulation: forward and backward each microbatch in turn (one stage).

    Returns the ``logged`` value of ``loss_func`` for every microbatch.
    """
    model = _check_single_chunk(model, "forward_backward_no_pipelining")
    iterators = _per_chunk(data_iterator, 1, "data_iterator")
    step = _Step(forward_step_func, iterators, model, num_microbatches, seq_length,
                 micro_batch_size, forward_only, no_sync_func, grad_sync_func, grad_scale_func,
                 recorder)  # fmt: skip
    for microbatch in range(num_microbatches):
        output = step.forward(0, microbatch, None, is_last=True)
        if not forward_only:
            step.backward(0, microbatch, None, output, None)
    step.finish(finalize_model_grads_func)
    return step.losses


def forward_backward_pipelining_without_interleaving(
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator | list[Iterator],
    model: nn.Module | list[nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    *,
    no_sync_func: OneOrPerChunk = None,
    grad_sync_func: OneOrPerChunk = None,
    finalize_model_grads_func: Callable[[list[nn.Module]], None] | None = None,
    grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
    recorder: ScheduleRecorder | None = None,
) -> list[Any]:
    """1F1B (PipeDream-Flush): warm-up forwards, one-forward-one-backward, cool-down backwards.

    Rank r of p runs ``p - r - 1`` warm-up forwards, so at most ``p - r`` microbatches are in
    flight on it. Returns the ``logged`` losses on the last stage, ``[]`` elsewhere.
    """
    model = _check_single_chunk(model, "forward_backward_pipelining_without_interleaving")
    iterators = _per_chunk(data_iterator, 1, "data_iterator")
    p = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    is_first, is_last = rank == 0, rank == p - 1
    if num_microbatches < p and not forward_only:
        warnings.warn(
            f"--num-microbatches ({num_microbatches}) is smaller than "
            f"--pipeline-model-parallel-size ({p}): most of the step is pipeline bubble",
            stacklevel=2,
        )
    step = _Step(forward_step_func, iterators, model, num_microbatches, seq_length,
                 micro_batch_size, forward_only, no_sync_func, grad_sync_func, grad_scale_func,
                 recorder)  # fmt: skip
    spec = step.spec
    num_warmup = min(p - rank - 1, num_microbatches)
    num_steady = num_microbatches - num_warmup
    saved: deque[tuple[Activations | None, Activations]] = deque()

    def recv_forward() -> Activations | None:
        return None if is_first else p2p.recv_forward(spec)

    def keep(input_tensor: Activations | None, output: Activations) -> None:
        # Kept for backward until the gradient of ``output`` comes back. A sent output's data
        # is dead weight: only its graph is needed.
        if not forward_only:
            saved.append((input_tensor, output))
            if not is_last:
                deallocate_message(output)

    # Warm-up: forwards only, filling the pipeline.
    for microbatch in range(num_warmup):
        input_tensor = recv_forward()
        output = step.forward(0, microbatch, input_tensor, is_last)
        if not is_last:
            p2p.send_forward(output, spec)
        keep(input_tensor, output)

    # Steady state: each forward is paired with the backward of the oldest microbatch.
    input_tensor = recv_forward() if num_steady > 0 else None
    for i in range(num_steady):
        last_iteration = i == num_steady - 1
        output = step.forward(0, num_warmup + i, input_tensor, is_last)
        if forward_only:
            if not is_last:
                p2p.send_forward(output, spec)
            input_tensor = None if last_iteration else recv_forward()
            continue
        output_grad = None if is_last else p2p.send_forward_recv_backward(output, spec)
        keep(input_tensor, output)
        old_input, old_output = saved.popleft()
        input_grad = step.backward(0, i, old_input, old_output, output_grad)
        if is_first:
            input_tensor = None
        elif last_iteration:
            p2p.send_backward(_input_grad(input_grad), spec)
        else:
            input_tensor = p2p.send_backward_recv_forward(_input_grad(input_grad), spec)

    # Cool-down: the backwards of the warm-up microbatches.
    if not forward_only:
        for i in range(num_warmup):
            old_input, old_output = saved.popleft()
            output_grad = None if is_last else p2p.recv_backward(spec)
            input_grad = step.backward(0, num_steady + i, old_input, old_output, output_grad)
            if not is_first:
                p2p.send_backward(_input_grad(input_grad), spec)
    step.finish(finalize_model_grads_func)
    return step.losses


def forward_backward_pipelining_with_interleaving(
    forward_step_func: ForwardStepFunc,
    data_iterator: list[Iterator],
    model: list[nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    *,
    no_sync_func: OneOrPerChunk = None,
    grad_sync_func: OneOrPerChunk = None,
    finalize_model_grads_func: Callable[[list[nn.Module]], None] | None = None,
    grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
    recorder: ScheduleRecorder | None = None,
) -> list[Any]:
    """Interleaved 1F1B over v model chunks per rank (Narayanan et al. 2021).

    Each rank holds v chunks; chunk k of rank r is virtual stage ``k·p + r``. Microbatches
    go in groups of p: a group runs through chunk 0 of every rank, then chunk 1, and so on,
    which divides the bubble by v at the cost of v times more p2p messages. The schedule is a
    sequence of ``v·m`` "virtual microbatches" per rank; virtual microbatch ``k`` is
    microbatch ``(k // (p·v))·p + k % p`` on chunk ``(k % (p·v)) // p`` (forward) or on the
    mirrored chunk ``v - 1 - (k % (p·v)) // p`` (backward).

    ``data_iterator`` is a list with one iterator per chunk. Raises ValueError when
    ``num_microbatches`` is not a multiple of the pipeline size.
    """
    if not isinstance(model, list) or not isinstance(data_iterator, list):
        raise ValueError(
            "interleaved pipelining needs a list of model chunks and a list of data iterators, "
            "one per chunk"
        )
    p = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    v, m = len(model), num_microbatches
    if m % p != 0:
        raise ValueError(
            f"interleaved pipelining needs --num-microbatches ({m}) to be a multiple of "
            f"--pipeline-model-parallel-size ({p}); change --global-batch-size or "
            "--micro-batch-size, or drop --num-layers-per-virtual-pipeline-stage"
        )
    iterators = _per_chunk(data_iterator, v, "data_iterator")
    step = _Step(forward_step_func, iterators, model, m, seq_length, micro_batch_size,
                 forward_only, no_sync_func, grad_sync_func, grad_scale_func, recorder)  # fmt: skip
    spec = step.spec
    total = m * v
    first_rank, last_rank = rank == 0, rank == p - 1

    def chunk_of(k: int, forward: bool) -> int:
        chunk = (k % (p * v)) // p
        return chunk if forward else v - 1 - chunk

    def microbatch_of(k: int) -> int:
        return (k // (p * v)) * p + k % p

    def is_first_stage(chunk: int) -> bool:
        return first_rank and chunk == 0

    def is_last_stage(chunk: int) -> bool:
        return last_rank and chunk == v - 1

    # Received activations waiting for their forward, and gradients waiting for their
    # backward, per chunk; (input, output) pairs waiting for their backward, per chunk.
    inputs: list[deque[Activations]] = [deque() for _ in range(v)]
    output_grads: list[deque[Gradients]] = [deque() for _ in range(v)]
    saved: list[deque[tuple[Activations | None, Activations]]] = [deque() for _ in range(v)]

    def forward_k(k: int) -> Activations | None:
        """Forward virtual microbatch k; return the output to send (None off the last stage)."""
        chunk = chunk_of(k, forward=True)
        input_tensor = None if is_first_stage(chunk) else inputs[chunk].popleft()
        output = step.forward(chunk, microbatch_of(k), input_tensor, is_last_stage(chunk))
        if not forward_only:
            saved[chunk].append((input_tensor, output))
        return None if is_last_stage(chunk) else output

    def backward_k(k: int) -> Gradients | None:
        """Backward virtual microbatch k; return its input gradient (None on the first stage)."""
        chunk = chunk_of(k, forward=False)
        input_tensor, output = saved[chunk].popleft()
        output_grad = None if is_last_stage(chunk) else output_grads[chunk].popleft()
        input_grad = step.backward(chunk, microbatch_of(k), input_tensor, output, output_grad)
        return None if is_first_stage(chunk) else _input_grad(input_grad)

    def free(output: Activations | None) -> None:
        if output is not None and not forward_only:
            deallocate_message(output)

    # Warm-up length: enough forwards that every rank's first backward finds its gradient.
    # With m == p there is no steady state: all forwards, then all backwards.
    all_warmup = forward_only or m == p
    if all_warmup:
        num_warmup = total
    else:
        num_warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    num_steady = total - num_warmup

    if not first_rank:
        inputs[0].append(p2p.recv_forward(spec))
    for k in range(num_warmup):
        output = forward_k(k)
        # The activation this rank receives now is the input of its next forward. Rank 0's
        # chunk 0 reads data instead, and nothing follows the last forward.
        next_chunk = chunk_of(k + 1, forward=True)
        recv_prev = not (first_rank and next_chunk == 0) and k != total - 1
        if k == num_warmup - 1 and not all_warmup:
            # Entering the steady state: also receive the first gradient.
            recv_next = not last_rank
            input_tensor, output_grad = p2p.communicate(output, None, recv_prev, recv_next, spec)
            if recv_next:
                output_grads[v - 1].append(p2p.received(output_grad))
        else:
            input_tensor, _ = p2p.communicate(output, None, recv_prev, False, spec)
        if recv_prev:
            inputs[next_chunk].append(p2p.received(input_tensor))
        free(output)

    for i in range(num_steady):
        k_forward, k_backward = num_warmup + i, i
        output = forward_k(k_forward)
        input_grad = backward_k(k_backward)
        # Which chunk the arriving activation and gradient belong to. Rank 0 receives from
        # the last rank (wrapping around), which is p - 1 virtual microbatches behind; the
        # last rank likewise receives gradients from rank 0.
        if first_rank:
            sender_chunk = chunk_of(k_forward - (p - 1), forward=True)
            recv_prev, next_chunk = sender_chunk != v - 1, sender_chunk + 1
        else:
            recv_prev, next_chunk = True, chunk_of(k_forward + 1, forward=True)
        if last_rank:
            sender_chunk = chunk_of(k_backward - (p - 1), forward=False)
            recv_next, next_grad_chunk = sender_chunk != 0, sender_chunk - 1
        else:
            recv_next, next_grad_chunk = True, chunk_of(k_backward + 1, forward=False)
        if i == num_steady - 1:
            recv_prev = False  # no forwards left
        input_tensor, output_grad = p2p.communicate(output, input_grad, recv_prev, recv_next, spec)
        free(output)
        if recv_prev:
            inputs[next_chunk].append(p2p.received(input_tensor))
        if recv_next:
            output_grads[next_grad_chunk].append(p2p.received(output_grad))

    if not forward_only:
        if all_warmup and not last_rank:
            output_grads[v - 1].append(p2p.recv_backward(spec))
        for k in range(num_steady, total):
            input_grad = backward_k(k)
            next_grad_chunk = chunk_of(k + 1, forward=False)
            recv_next = not (last_rank and next_grad_chunk == v - 1) and k != total - 1
            _, output_grad = p2p.communicate(None, input_grad, False, recv_next, spec)
            if recv_next:
                output_grads[next_grad_chunk].append(p2p.received(output_grad))
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    step.finish(finalize_model_grads_func)
    return step.losses
