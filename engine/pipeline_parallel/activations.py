"""What happens to an activation a stage has sent downstream: its values are freed at once
(only its autograd graph is needed later), and the backward later runs from it with the
gradient the next stage sends back, without the shape check it would now fail."""

from __future__ import annotations

from typing import cast

import torch
from torch.autograd import Variable

from engine.pipeline_parallel import p2p
from engine.pipeline_parallel.p2p import Activations, Gradients


def deallocate_output_tensor(output: torch.Tensor) -> None:
    """Free the data of an output already sent downstream, keeping its autograd graph.

    Backward needs only ``output.grad_fn`` (and what it saved), never ``output``'s values, so
    its storage is replaced by one element. The output must own its storage: freeing a view
    would leave its base alive.
    """
    if output._base is not None:
        raise RuntimeError(
            "a pipeline stage's output must not be a view of another tensor (its memory could "
            "not be freed): return a fresh tensor, e.g. out.clone()"
        )
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype)


def deallocate_message(output: Activations) -> None:
    """`deallocate_output_tensor` for every tensor of a sent message that has an autograd
    graph. The others (integer tensors, constants, a received input passed on as it is) are
    left alone: the stage may not own them (a batch's ids), and they hold no graph."""
    if isinstance(output, torch.Tensor):
        deallocate_output_tensor(output)
        return
    for tensor in output:
        if tensor.grad_fn is not None:
            deallocate_output_tensor(tensor)


def custom_backward(output: Activations, grad_output: Gradients) -> None:
    """Backward from ``output`` with ``grad_output`` without checking their shapes match.

    `torch.autograd.backward` compares the two shapes, and ``output`` has been shrunk to one
    element by `deallocate_output_tensor`; the autograd engine itself only needs the graph.
    For a message of several tensors the backward runs from all of them at once, each with
    its gradient; tensors without one (integer tensors) or without a graph are left out.
    """
    if isinstance(output, torch.Tensor):
        outputs: tuple[torch.Tensor, ...] = (output,)
        grads: tuple[torch.Tensor | None, ...] = (cast(torch.Tensor, grad_output),)
    else:
        pairs = [
            (tensor, grad)
            for tensor, grad in zip(output, p2p.as_tuple(grad_output), strict=True)
            if grad is not None and tensor.requires_grad
        ]
        if not pairs:
            return
        outputs, grads = tuple(t for t, _ in pairs), tuple(g for _, g in pairs)
    Variable._execution_engine.run_backward(
        tensors=outputs,
        grad_tensors=grads,
        keep_graph=False,
        create_graph=False,
        inputs=(),
        allow_unreachable=True,
        accumulate_grad=True,
    )
