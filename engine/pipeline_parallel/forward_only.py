"""One forward-only pass through the pipeline: no microbatches, no backward, no loss.

Generation (`engine.inference.generation`) and evaluation (`engine.inference.perplexity`) run
each batch once through every stage, in order::

    spec = activation_spec(model, (s, b, h))
    out = forward_only_pass(lambda hidden: model(ids, decoder_input=hidden), spec)

Each stage receives the previous stage's output ``[s, b, h]`` (not on the first stage), runs
its own layers and sends its output ``[s, b, h]`` on (not on the last stage). The last stage's
output, whatever its shape (logits, per-token losses), is returned there; the other stages
get None. The messages go through `engine.pipeline_parallel.p2p` like the schedules', so one
layer fixes their shape and dtype up front and checks every send against them.

The call is collective over the pipeline group: every stage must call it with the same
``spec.tensor_shape`` (each stage of a pipeline sees the same batch, so each computes the
same shape). With one pipeline stage nothing is communicated.

A model that declares its pipeline message (``pipeline_message(seq_length, batch_size)``, see
`engine.pipeline_parallel.p2p`) gets that message here too: `activation_spec` asks the model
for it, each stage's ``run_stage`` receives the previous stage's tuple of tensors (a message of
one tensor stays a plain tensor) and returns its own. The declared dtypes are the model's to
choose; one that may be cast after it is built should read them off its parameters.

The dtype of the messages is that of the stage's activations, which is the dtype of the
model's parameters: the first stage's embedding hands its parameters' dtype to every layer,
and nothing in a forward-only pass casts to another (no mixed-precision autocast, no
``pipeline_dtype`` distinct from the weights as in training). The parameters are read rather
than ``config.params_dtype`` because a model can be cast after it is built (``model.bfloat16()``
after loading a float32 checkpoint) and the config is not updated then: the parameters are
what the stage actually computes in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn

from engine import parallel_state
from engine.pipeline_parallel import p2p
from engine.pipeline_parallel.p2p import Activations, P2PSpec
from engine.wrappers import unwrap

RunStage = Callable[[Activations | None], Activations]
"""``run_stage(decoder_input) -> output``: this stage's forward. ``decoder_input`` is the
previous stage's output ``[s, b, h]`` (or the tuple of a declared message), None on the first
stage (which reads the tokens)."""


def activation_spec(model: nn.Module, tensor_shape: Sequence[int]) -> P2PSpec:
    """The messages of a forward-only pass of ``model``: ``tensor_shape`` ``[s, b, h]`` (``s/tp``
    under sequence parallelism) in the dtype and on the device of the model's parameters
    (see the module docstring for why the parameters, not the config).

    A model that declares its message gets it instead, for ``seq_length = s`` (``s/tp · tp``
    under sequence parallelism) and ``micro_batch_size = b``.
    """
    param = next(model.parameters())
    seq, batch = tensor_shape[0], tensor_shape[1]
    if getattr(getattr(unwrap(model), "config", None), "sequence_parallel", False):
        seq *= parallel_state.get_tensor_model_parallel_world_size()
    message = p2p.declared_message(model, seq, batch)
    if message is not None:
        return P2PSpec.declared(message, param.device)
    return P2PSpec(tuple(tensor_shape), param.dtype, param.device)


@torch.no_grad()
def forward_only_pass(run_stage: RunStage, spec: P2PSpec) -> torch.Tensor | None:
    """Run one batch through this pipeline stage (collective over the pipeline group).

    Args:
        run_stage: this stage's forward, ``run_stage(decoder_input) -> output``; called once,
            under ``torch.no_grad()``.
        spec: the activation messages: ``spec.tensor_shape`` ``[s, b, h]`` (or a declared
            message), dtype and device (`activation_spec`).

    Returns:
        The last stage's output (e.g. logits ``[b, s, V/tp]`` or losses ``[b, s]``) on the last
        stage; None on the other stages, after sending their output ``[s, b, h]`` (or their
        declared message) on.
    """
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
        raise ValueError(
            "a forward-only pass runs one model chunk per stage: build the model without "
            "--num-layers-per-virtual-pipeline-stage"
        )
    decoder_input: Activations | None = None
    if not parallel_state.is_pipeline_first_stage():
        # Nothing flows back: the received activations need no gradient.
        received = p2p.recv_forward(spec)
        if isinstance(received, torch.Tensor):
            decoder_input = received.detach()
        else:
            decoder_input = tuple(tensor.detach() for tensor in received)
    output = run_stage(decoder_input)
    if parallel_state.is_pipeline_last_stage():
        return cast(torch.Tensor, output)
    p2p.send_forward(output, spec)
    return None
