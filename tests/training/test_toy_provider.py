"""A model family from outside the engine whose pipeline stages pass a tuple
(`tests.training.toy_provider`: hidden states and a context vector): it satisfies the model
contract, trains at PP=2 under torchrun through ``--model-provider``, and its losses at PP=2
(1F1B and interleaved) and at TP=2 equal the single-process run's."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from engine import parallel_state
from engine.models.build import build_model_chunks
from engine.models.chunk import ModelChunk
from engine.models.families import register_family
from tests.rank_pool import RankPool, module_pool
from tests.training.test_model_provider import torchrun_pretrain_at_pp2
from tests.training.test_training import corpus, make_job  # noqa: F401 (a fixture)
from tests.training.toy_provider import TOY, context_size

pool = module_pool(2)


@pytest.fixture(scope="module")
def solo():
    """One rank: the TP=1 x PP=1 x DP=1 reference."""
    ranks = RankPool(1)
    yield ranks
    ranks.close()


def toy_job(corpus: str, tp: int, pp: int, **sections):  # noqa: F811
    """The tiny configuration on byte tokens (as `test_training`), 4 layers, 3 iterations."""
    job = make_job(corpus, tp, pp, train_iters=3, training={"eval_iters": 0}, **sections)
    return dataclasses.replace(job, model=dataclasses.replace(job.model, num_layers=4))


def train(job):
    from engine.training import pretrain

    return pretrain(job, model_provider=TOY)


TOY_CONFIG = make_job("unused", 1, 1).model  # the tiny preset, vocabulary 256


def contract_check() -> dict:
    """One chunk holding the whole model (a world of one): what the contract asks of it."""
    config = dataclasses.replace(TOY_CONFIG, family=register_family(TOY).name)
    parallel_state.initialize_model_parallel()
    try:
        (chunk,) = build_model_chunks(config)  # also checks the contract
        tokens = torch.randint(
            0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)
        )
        return {
            "is_chunk": isinstance(chunk, ModelChunk),
            "stages": (chunk.pre_process, chunk.post_process),
            "layers": [layer.layer_number for layer in chunk.layers],
            "message": chunk.pipeline_message(32, 2),
            "context": context_size(config),
            "losses": chunk(tokens[:, :-1], labels=tokens[:, 1:]).detach(),
            "logits": tuple(chunk(tokens[:, :-1]).shape),
            "built": sum(p.numel() for p in chunk.parameters()),
            "declared": config.inventory(1).stage_parameters([0, 1], True, True),
        }
    finally:
        parallel_state.destroy_model_parallel()


def test_the_family_builds_model_chunks_that_satisfy_the_contract(solo):
    r = solo.run(contract_check)[0]
    assert r["is_chunk"] and r["stages"] == (True, True) and r["layers"] == [0, 1]
    assert r["message"] == [((32, 2, 64), torch.float32), ((2, r["context"]), torch.float32)]
    assert r["logits"] == (2, 32, 256) and r["losses"].shape == (2, 32)
    # Small initial weights: the first loss is about that of a uniform guess.
    assert r["losses"].mean().item() == pytest.approx(math.log(256), rel=0.05)
    assert r["built"] == r["declared"]


@pytest.fixture(scope="module")
def reference(solo, corpus):  # noqa: F811
    return solo.run(train, toy_job(corpus, 1, 1))[0].losses


@pytest.mark.parametrize(
    "tp, pp, parallel",
    [(1, 2, {}), (1, 2, {"virtual_pipeline_model_parallel_size": 2}), (2, 1, {})],
    ids=["pp2", "pp2-v2", "tp2"],
)
def test_losses_equal_the_single_process_run(pool, reference, corpus, tp, pp, parallel):  # noqa: F811
    results = pool.run(train, toy_job(corpus, tp, pp, parallel=parallel))
    for result in results:  # every rank knows the global loss
        assert result.losses == results[0].losses
    assert sorted(results[0].losses) == [1, 2, 3]
    for i in (1, 2, 3):
        assert results[0].losses[i] == pytest.approx(reference[i], rel=1e-5), i
    assert reference[3] < reference[1], f"the loss did not fall: {reference}"


def test_examples_pretrain_trains_the_toy_family_at_pp2(corpus, tmp_path):  # noqa: F811
    metadata = torchrun_pretrain_at_pp2("tests.training.toy_provider:TOY", corpus, tmp_path)
    assert metadata["model"]["family"] == "toy-mixer"
