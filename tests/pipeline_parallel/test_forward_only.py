"""The forward-only pipeline pass (`engine.pipeline_parallel.forward_only`) on real gloo ranks.

At PP=2, PP=4 and TP=2 x PP=2 the last stage's output of one pass of a tiny model (logits
gathered over TP, and per-token losses) must equal the single-process model's on the same
input within 1e-5 in float32, and the other stages must get None. With bfloat16 parameters
(built so, or cast after building while the config still says float32) the activations that
travel between stages are bfloat16, and the output matches the single-process bfloat16 model
(bit for bit without TP).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import parallel_state
from engine.models import LlamaModel, ModelConfig
from engine.models.build import build_model_chunks
from engine.pipeline_parallel.forward_only import activation_spec, forward_only_pass
from engine.tensor_parallel import gather_from_tensor_model_parallel_region
from tests.rank_pool import module_pool

BATCH, SEQ = 2, 8
CONFIG = ModelConfig.from_preset("tiny", num_layers=4)

pool = module_pool(4)


def _inputs(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _model(config: ModelConfig, cast: torch.dtype | None) -> LlamaModel:
    (model,) = build_model_chunks(config)
    return (model.to(cast) if cast is not None else model).eval()


def _reference(config: ModelConfig, cast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Logits ``[b, s, V]`` and losses ``[b, s]`` of the whole model in one process."""
    parallel_state.initialize_model_parallel()
    try:
        model = _model(config, cast)
        input_ids, labels = _inputs(config.vocab_size)
        with torch.no_grad():
            logits = model(input_ids)[..., : config.vocab_size]
            losses = model(input_ids, labels=labels)
        return {"logits": logits, "losses": losses}
    finally:
        parallel_state.destroy_model_parallel()


def pipelined_vs_single(
    config: ModelConfig, tp: int, pp: int, cast: torch.dtype | None = None
) -> dict[str, object]:
    """One forward-only pass at TP x PP and the single-process reference, on every rank."""
    reference = _reference(config, cast)
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        model = _model(config, cast)
        input_ids, labels = _inputs(config.vocab_size)
        last = parallel_state.is_pipeline_last_stage()
        spec = activation_spec(model, (SEQ, BATCH, config.hidden_size))
        received: list[torch.dtype] = []

        def run_stage(hidden, **kwargs):
            if hidden is not None:
                received.append(hidden.dtype)
                assert tuple(hidden.shape) == (SEQ, BATCH, config.hidden_size)
                assert not hidden.requires_grad
            return model(input_ids, decoder_input=hidden, **kwargs)

        logits = forward_only_pass(run_stage, spec)
        losses = forward_only_pass(lambda h: run_stage(h, labels=labels if last else None), spec)
        if logits is not None:
            logits = gather_from_tensor_model_parallel_region(logits)[..., : config.vocab_size]
        return {
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "last": last,
            "spec_dtype": spec.dtype,
            "received": received,
            "logits": logits,
            "losses": losses,
            "reference": reference,
        }
    finally:
        parallel_state.destroy_model_parallel()


def _check(results: list[dict], pp: int, dtype: torch.dtype, tolerance: dict) -> None:
    assert sorted({r["pp_rank"] for r in results}) == list(range(pp))
    for r in results:
        assert r["spec_dtype"] == dtype
        # Every stage but the first received the previous stage's output, once per pass.
        assert r["received"] == ([] if r["pp_rank"] == 0 else [dtype, dtype])
        if not r["last"]:
            assert r["logits"] is None and r["losses"] is None
            continue
        assert r["logits"].dtype == dtype
        torch.testing.assert_close(r["logits"], r["reference"]["logits"], **tolerance)
        torch.testing.assert_close(r["losses"], r["reference"]["losses"], **tolerance)


FLOAT32 = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp, pp", [(1, 2), (1, 4), (2, 2)])
def test_last_stage_output_equals_single_process_float32(pool, tp, pp):
    results = pool.run(pipelined_vs_single, CONFIG, tp, pp)
    _check(results, pp, torch.float32, FLOAT32)


# Without TP the stages compute in bfloat16 exactly as the whole model does (same ops, same
# order): bit for bit. TP's split reductions round differently: bfloat16's tolerance.
EXACT = dict(rtol=0, atol=0)
BFLOAT16 = dict(rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)])
def test_bfloat16_parameters_travel_as_bfloat16(pool, tp, pp):
    config = dataclasses.replace(CONFIG, params_dtype=torch.bfloat16)
    results = pool.run(pipelined_vs_single, config, tp, pp)
    _check(results, pp, torch.bfloat16, EXACT if tp == 1 else BFLOAT16)


def test_received_dtype_follows_parameters_cast_after_building(pool):
    """A float32 config, parameters cast to bfloat16 afterwards (as after loading): the
    activations are bfloat16, so the messages must be too (not ``config.params_dtype``)."""
    results = pool.run(pipelined_vs_single, CONFIG, 1, 4, torch.bfloat16)
    _check(results, 4, torch.bfloat16, EXACT)
