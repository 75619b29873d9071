"""Pipeline messages a model declares (`pipeline_message`), on real gloo ranks.

A toy stage sends the next one a tuple: hidden states ``[s, b, h]`` and a per-sequence
context ``[b, c]`` (both float32), and in one variant the token ids ``[b, s]`` (int64, no
gradient) which the last stage reads to weight its loss. Under 1F1B at PP=2 (with DP=2) and
PP=4, interleaved PP=2 x v=2 and no pipelining, each microbatch's per-token losses and every
parameter's gradient equal a single-process gradient-accumulation loop within 1e-5 relative;
forward-only runs (the schedule's and `forward_only_pass`) give the same losses. A stage
output that is not what the model declares, and a malformed declaration, are ValueErrors
naming what was expected and what came.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import parallel_state
from engine.pipeline_parallel import p2p
from engine.pipeline_parallel.forward_only import activation_spec, forward_only_pass
from engine.pipeline_parallel.layout import virtual_stage_layers
from engine.pipeline_parallel.p2p import P2PSpec
from engine.pipeline_parallel.schedules import (
    _gradient_of,
    _message_spec,
    get_forward_backward_func,
)
from engine.pipeline_parallel.timeline import ScheduleRecorder
from tests.rank_pool import module_pool

VOCAB, HIDDEN, CONTEXT, LAYERS = 48, 16, 6, 4
MICRO_BATCH, SEQ = 2, 8

pool = module_pool(4)


def _param(name: str, *shape: int) -> nn.Parameter:
    """A parameter drawn from a generator seeded by its name (the same in every layout)."""
    generator = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + len(name))
    return nn.Parameter(torch.randn(*shape, generator=generator) * 0.3)


class MixerLayer(nn.Module):
    """``x += tanh(W x + U c)``, then ``c += tanh(V mean_s(x))``."""

    def __init__(self, n: int):
        super().__init__()
        self.layer_number = n
        self.w = _param(f"{n}.w", HIDDEN, HIDDEN)
        self.u = _param(f"{n}.u", HIDDEN, CONTEXT)
        self.v = _param(f"{n}.v", CONTEXT, HIDDEN)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + torch.tanh(F.linear(x, self.w) + F.linear(c, self.u).unsqueeze(0))
        return x, c + torch.tanh(F.linear(x.mean(0), self.v))


class ToyStage(nn.Module):
    """One pipeline stage (all of the model with ``first`` and ``last``) of a toy model whose
    stages pass ``(hidden [s, b, h], context [b, c])``, plus ``ids [b, s]`` with ``with_ids``.

    ``declare_context`` is the context width it declares (a wrong one for the error test).
    """

    def __init__(self, layers, first, last, with_ids=False, declare_context=CONTEXT):
        super().__init__()
        self.pre_process, self.post_process, self.with_ids = first, last, with_ids
        self.declare_context = declare_context
        self.input_tensor = None
        if first:
            self.embedding = _param("embedding", VOCAB, HIDDEN)
            self.context_in = _param("context_in", CONTEXT, HIDDEN)
        self.layers = nn.ModuleList(MixerLayer(n) for n in layers)
        if last:
            self.head = _param("head", VOCAB, HIDDEN)
            self.context_head = _param("context_head", VOCAB, CONTEXT)

    def pipeline_message(self, seq_length: int, micro_batch_size: int):
        message = [
            ((seq_length, micro_batch_size, HIDDEN), torch.float32),
            ((micro_batch_size, self.declare_context), torch.float32),
        ]
        if self.with_ids:
            message.append(((micro_batch_size, seq_length), torch.int64))
        return message

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor

    def forward(self, input_ids, labels=None, decoder_input=None):
        received = self.input_tensor if decoder_input is None else decoder_input
        if self.pre_process:
            x = self.embedding[input_ids.t()]  # [s, b, h]
            c = torch.tanh(F.linear(x.mean(0), self.context_in))
            ids = input_ids
        else:
            x, c, *rest = received
            ids = rest[0] if self.with_ids else input_ids
        for layer in self.layers:
            x, c = layer(x, c)
        if not self.post_process:
            return (x, c, ids.clone()) if self.with_ids else (x, c)
        logits = F.linear(x, self.head) + F.linear(c, self.context_head).unsqueeze(0)
        losses = F.cross_entropy(logits.transpose(1, 2), labels.t(), reduction="none").t()
        # The ids that came through the pipeline weight the loss: they must arrive intact.
        return losses * (1.0 + (ids % 2)) if self.with_ids else losses


def _microbatches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (count, MICRO_BATCH, SEQ + 1), generator=generator)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def forward_step(data_iterator, model):
    inputs, labels = next(data_iterator)
    output = model(inputs, labels=labels if model.post_process else None)
    return output, lambda out: (out.mean(), out.detach())


def _grads(chunks: list[ToyStage]) -> dict[str, torch.Tensor]:
    """Gradients under layout-free names (``layers.<global n>.w``)."""
    grads = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name.startswith("layers."):
                _, local, rest = name.split(".", 2)
                name = f"layers.{chunk.layers[int(local)].layer_number}.{rest}"
            grads[name] = None if param.grad is None else param.grad.clone()
    return grads


def reference_run(num_microbatches: int, with_ids: bool) -> dict:
    model = ToyStage(range(LAYERS), True, True, with_ids)
    losses = []
    for inputs, labels in _microbatches(num_microbatches):
        loss = model(inputs, labels=labels)
        (loss.mean() / num_microbatches).backward()
        losses.append(loss.detach())
    return {"losses": losses, "grads": _grads([model])}


def _build_chunks(pp: int, vpp: int | None, with_ids: bool, **kwargs) -> list[ToyStage]:
    stages = virtual_stage_layers(LAYERS, pp, vpp)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for k in range(vpp or 1):
        if vpp is not None:
            parallel_state.set_virtual_pipeline_model_parallel_rank(k)
        chunks.append(
            ToyStage(
                stages[k * pp + rank],
                parallel_state.is_pipeline_first_stage(),
                parallel_state.is_pipeline_last_stage(),
                with_ids,
                **kwargs,
            )
        )
    if vpp is not None:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


def pipeline_run(pp: int, vpp: int | None, counts: list[int], with_ids: bool) -> list[dict]:
    """The reference and the pipelined run (training, then forward only) per microbatch
    count, on every rank."""
    references = {m: reference_run(m, with_ids) for m in counts}
    parallel_state.initialize_model_parallel(1, pp, vpp)
    try:
        results = []
        for m in counts:
            chunks = _build_chunks(pp, vpp, with_ids)
            batches = _microbatches(m)

            def iterators(chunks=chunks, batches=batches):
                return [iter(batches) for _ in chunks] if vpp else iter(batches)

            recorder = ScheduleRecorder()
            schedule = get_forward_backward_func()
            losses = schedule(forward_step, iterators(), chunks, m, SEQ, MICRO_BATCH,
                              recorder=recorder)  # fmt: skip
            grads = _grads(chunks)
            with torch.no_grad():
                eval_losses = schedule(forward_step, iterators(), chunks, m, SEQ, MICRO_BATCH,
                                       forward_only=True)  # fmt: skip
            results.append(
                {
                    "m": m,
                    "reference": references[m],
                    "losses": losses,
                    "eval_losses": eval_losses,
                    "grads": grads,
                    "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                    "dp_rank": parallel_state.get_data_parallel_rank(),
                    "final_in_flight": recorder.in_flight,
                }
            )
        return results
    finally:
        parallel_state.destroy_model_parallel()


def check_parity(per_rank: list[list[dict]], pp: int, what: str) -> None:
    for index, first in enumerate(per_rank[0]):
        m, reference = first["m"], first["reference"]
        ranks = [results[index] for results in per_rank if results[index]["dp_rank"] == 0]
        for r in ranks:
            assert r["final_in_flight"] == 0, what
            if r["pp_rank"] != pp - 1:
                assert r["losses"] == [] and r["eval_losses"] == [], what
                continue
            for key in ("losses", "eval_losses"):
                assert len(r[key]) == m, f"{what} m={m} {key}"
                for got, expected in zip(r[key], reference["losses"], strict=True):
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        merged = {}
        for r in ranks:
            merged.update(r["grads"])
        assert merged.keys() == reference["grads"].keys(), what
        for name, expected in reference["grads"].items():
            assert merged[name] is not None, f"{what} m={m}: {name} got no gradient"
            scale = expected.abs().max().item()
            torch.testing.assert_close(
                merged[name], expected, rtol=1e-5, atol=1e-5 * scale, msg=f"{what} m={m}: {name}"
            )


@pytest.mark.parametrize(
    "pp, vpp, counts",
    [(2, None, [1, 2, 5]), (4, None, [1, 4, 9]), (2, 2, [2, 4, 6]), (1, None, [1, 3])],
    ids=["1f1b-pp2", "1f1b-pp4", "interleaved-pp2-v2", "no-pipelining"],
)
def test_two_tensor_message_matches_single_process(pool, pp, vpp, counts):
    per_rank = pool.run(pipeline_run, pp, vpp, counts, False)
    check_parity(per_rank, pp, f"pp={pp} v={vpp}")


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_an_integer_tensor_travels_without_gradient(pool, vpp):
    """``(hidden, context, ids int64)``: the ids reach the last stage intact (they weight its
    loss) and nothing flows back for them (a gradient message would not match otherwise)."""
    per_rank = pool.run(pipeline_run, 2, vpp, [4], True)
    check_parity(per_rank, 2, f"with ids v={vpp}")


def forward_only_pass_run(with_ids: bool) -> dict:
    """`forward_only_pass` with the model's declared message: the last stage's losses."""
    (inputs, labels), = _microbatches(1)  # fmt: skip
    reference = ToyStage(range(LAYERS), True, True, with_ids)
    with torch.no_grad():
        expected = reference(inputs, labels=labels)
    parallel_state.initialize_model_parallel(1, 4)
    try:
        (chunk,) = _build_chunks(4, None, with_ids)
        spec = activation_spec(chunk, (SEQ, MICRO_BATCH, HIDDEN))
        received = []

        def run_stage(message):
            if message is not None:
                received.append([(tuple(t.shape), t.dtype, t.requires_grad) for t in message])
            last = parallel_state.is_pipeline_last_stage()
            return chunk(inputs, labels=labels if last else None, decoder_input=message)

        losses = forward_only_pass(run_stage, spec)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        return {"spec": spec.tensors, "received": received, "losses": losses,
                "expected": expected, "pp_rank": pp_rank}  # fmt: skip
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("with_ids", [False, True], ids=["two-tensors", "with-ids"])
def test_forward_only_pass_sends_the_declared_message(pool, with_ids):
    message = [((SEQ, MICRO_BATCH, HIDDEN), torch.float32), ((MICRO_BATCH, CONTEXT), torch.float32)]
    if with_ids:
        message.append(((MICRO_BATCH, SEQ), torch.int64))
    for r in pool.run(forward_only_pass_run, with_ids):
        assert list(r["spec"]) == message
        if r["pp_rank"] == 0:
            assert r["received"] == [] and r["losses"] is None
            continue
        assert r["received"] == [[(shape, dtype, False) for shape, dtype in message]]
        if r["pp_rank"] < 3:
            assert r["losses"] is None
        else:
            torch.testing.assert_close(r["losses"], r["expected"], rtol=1e-5, atol=0)


def wrong_message_run(declare_context: int) -> str | None:
    """A first stage that declares a context of ``declare_context`` but sends ``CONTEXT``: the
    send raises on that rank before anything is posted (the other ranks do not run)."""
    parallel_state.initialize_model_parallel(1, 2)
    try:
        (chunk,) = _build_chunks(2, None, False, declare_context=declare_context)
        if not parallel_state.is_pipeline_first_stage():
            return None
        batches = _microbatches(2)
        with pytest.raises(ValueError) as error:
            get_forward_backward_func()(forward_step, iter(batches), [chunk], 2, SEQ, MICRO_BATCH)
        return str(error.value)
    finally:
        parallel_state.destroy_model_parallel()


def test_an_output_other_than_the_declared_message_is_an_error(pool):
    messages = [m for m in pool.run(wrong_message_run, CONTEXT + 1) if m is not None]
    assert len(messages) == 2  # the first stage of each data-parallel replica
    assert messages[0] == (
        "pipeline stage output is 2 tensor(s) ([8, 2, 16] float32, [2, 6] float32), but the "
        "model declares its message (pipeline_message) as 2 tensor(s) ([8, 2, 16] float32, "
        "[2, 7] float32)"
    )


# The message's checks, in this process (they raise before anything is sent) -------------------

SPEC = P2PSpec.declared(
    [((SEQ, MICRO_BATCH, HIDDEN), torch.float32), ((MICRO_BATCH, CONTEXT), torch.float32),
     ((MICRO_BATCH, SEQ), torch.int64)],
    torch.device("cpu"),
)  # fmt: skip
HIDDEN_STATES = torch.zeros(SEQ, MICRO_BATCH, HIDDEN)
CONTEXT_VECTOR = torch.zeros(MICRO_BATCH, CONTEXT)
IDS = torch.zeros(MICRO_BATCH, SEQ, dtype=torch.int64)


def test_the_spec_of_a_declared_message():
    assert SPEC.tensor_shape == (SEQ, MICRO_BATCH, HIDDEN) and SPEC.dtype == torch.float32
    assert not SPEC.single and len(SPEC.tensors) == 3
    default = P2PSpec((SEQ, MICRO_BATCH, HIDDEN), torch.bfloat16, torch.device("cpu"))
    assert default.single and default.tensors == (((SEQ, MICRO_BATCH, HIDDEN), torch.bfloat16),)
    one = P2PSpec.declared([((4, 2), torch.float32)], torch.device("cpu"))
    assert one.single and one.message == (((4, 2), torch.float32),)


@pytest.mark.parametrize(
    "output, message",
    [
        ((HIDDEN_STATES, CONTEXT_VECTOR),
         "pipeline stage output is 2 tensor(s) ([8, 2, 16] float32, [2, 6] float32), but the "
         "model declares its message (pipeline_message) as 3 tensor(s) ([8, 2, 16] float32, "
         "[2, 6] float32, [2, 8] int64)"),
        ((HIDDEN_STATES, CONTEXT_VECTOR.double(), IDS),
         "([8, 2, 16] float32, [2, 6] float64, [2, 8] int64), but the model declares"),
        ((HIDDEN_STATES, CONTEXT_VECTOR, None), "([8, 2, 16] float32, [2, 6] float32, NoneType)"),
        (HIDDEN_STATES, "pipeline stage output is 1 tensor(s) ([8, 2, 16] float32)"),
    ],
    ids=["number", "dtype", "none", "plain-tensor"],
)  # fmt: skip
def test_a_wrong_output_is_a_clear_error(output, message):
    with pytest.raises(ValueError) as error:
        p2p.send_forward(output, SPEC)
    assert message in str(error.value)


def test_a_wrong_gradient_is_a_clear_error():
    with pytest.raises(ValueError, match=r"gradient of tensor 1 of the pipeline message is "
                                         r"\(\[2, 5\] float32\), but the model declares that "
                                         r"tensor as \(\[2, 6\] float32\)"):  # fmt: skip
        p2p.send_backward((HIDDEN_STATES, torch.zeros(MICRO_BATCH, 5), None), SPEC)
    with pytest.raises(ValueError, match="gradient of tensor 1 of the pipeline message is missing"):
        p2p.send_backward((HIDDEN_STATES, None, None), SPEC)
    with pytest.raises(ValueError, match="has 2 entries, but the message has 3 tensors"):
        p2p.send_backward((HIDDEN_STATES, CONTEXT_VECTOR), SPEC)


def test_a_tuple_for_the_default_message_is_an_error():
    default = P2PSpec((SEQ, MICRO_BATCH, HIDDEN), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"is 2 tensors, but the schedule's message is one tensor "
                                         r"of shape \(8, 2, 16\).*pipeline_message"):  # fmt: skip
        p2p.send_forward((HIDDEN_STATES, CONTEXT_VECTOR), default)
    # The default message's own checks are unchanged.
    with pytest.raises(ValueError, match=r"has shape \(8, 2, 15\), but the schedule's tensor "
                                         r"shape is \(8, 2, 16\)"):  # fmt: skip
        p2p.send_forward(torch.zeros(SEQ, MICRO_BATCH, HIDDEN - 1), default)


@pytest.mark.parametrize(
    "declared, message",
    [
        ([], "must return a non-empty list of (shape, dtype), got []"),
        ([((2, 3), "float32")], "entry 0 must be (shape, dtype)"),
        ([((2, -1), torch.float32)], "entry 0 must be (shape, dtype)"),
        ([((2, 3), torch.float32), (2, 3)], "entry 1 must be (shape, dtype)"),
        ([((2, 3), torch.int64)], "([2, 3] int64): at least one tensor must be floating-point"),
    ],
    ids=["empty", "dtype", "negative", "entry", "no-float"],
)
def test_a_malformed_declaration_is_an_error(declared, message):
    with pytest.raises(ValueError) as error:
        P2PSpec.declared(declared, torch.device("cpu"))
    assert message in str(error.value)


def test_every_chunk_of_a_rank_declares_the_same_message():
    chunks = [ToyStage([0], True, False), ToyStage([1], False, True, declare_context=3)]
    with pytest.raises(ValueError, match=r"every stage of a pipeline run sends the same message, "
                                         r"but this rank's model chunks declare"):  # fmt: skip
        _message_spec(chunks, SEQ, MICRO_BATCH, None)


def test_gradients_of_a_received_message():
    """None for the integer tensor, zeros for a float tensor the output did not depend on;
    None when no tensor got a gradient (the schedule then says the output ignores its input)."""
    hidden = torch.ones(3, requires_grad=True)
    context = torch.ones(2, requires_grad=True)
    ids = torch.zeros(2, dtype=torch.int64)
    assert _gradient_of((hidden, context, ids)) is None
    (hidden * 2).sum().backward()
    grads = _gradient_of((hidden, context, ids))
    assert grads[2] is None
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and torch.equal(grads[1], torch.zeros(2))
