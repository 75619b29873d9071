"""``--compile`` (`engine.models.compile`): torch.compile per decoder layer, on real gloo ranks
with the CPU's inductor backend.

- The decoder layer compiles to one graph with no graph break at TP=2 with sequence
  parallelism, without recomputation and with full or selective recomputation; its loss and
  gradients equal eager's.
- Compiled training through the trainer at TP=2 + SP x PP=2 (4 ranks, full recomputation,
  the distributed optimizer's overlapped reductions) and at TP=2 + SP x DP=2 under FSDP2 gives
  eager's losses within 1e-5 for 5 iterations, and reports the compile time once.

Both use the shapes of `tests.training.test_training.make_job` (hidden 64, 32 tokens, micro
batch 2), so the second compile reuses the kernels inductor cached for the first.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from tests.rank_pool import module_pool
from tests.training.test_training import corpus, make_job, train  # noqa: F401  (fixture)

pool = module_pool(4)


def compiled_against_eager(compile_name: str, model: dict) -> tuple[dict, int, float, float]:
    """(graph breaks, graphs compiled, |loss - eager loss|, max |grad - eager grad|) of the
    tiny model (with ``model``'s fields) at TP=2 + SP, with ``engine.models.compile``'s
    ``compile_name`` applied to it (`compile_layers` or `compile_loss_head`)."""
    import torch._dynamo.utils

    from engine import parallel_state
    from engine.models import LlamaModel, ModelConfig
    from engine.models import compile as compiling

    parallel_state.initialize_model_parallel(2, 1)
    try:
        config = ModelConfig.from_preset("tiny", vocab_size=256, sequence_parallel=True, **model)
        eager, compiled = LlamaModel(config), LlamaModel(config)
        compiled.load_state_dict(eager.state_dict())
        getattr(compiling, compile_name)([compiled])
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (2, 32), generator=generator)
        labels = torch.randint(0, 256, (2, 32), generator=generator)
        losses = []
        for chunk in (eager, compiled):
            loss = chunk(ids, labels=labels).mean()
            loss.backward()
            losses.append(loss.item())
        counters = torch._dynamo.utils.counters
        grads = max(
            (a.grad - b.grad).abs().max().item()
            for a, b in zip(eager.parameters(), compiled.parameters(), strict=True)
        )
        graphs = counters["stats"]["unique_graphs"]
        return dict(counters["graph_break"]), graphs, abs(losses[0] - losses[1]), grads
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("recompute", [None, "full", "selective"])
def test_decoder_layer_compiles_to_one_graph_without_breaks(pool, recompute):
    runs = pool.run(compiled_against_eager, "compile_layers", {"recompute_granularity": recompute})
    for breaks, graphs, loss, grads in runs:
        assert breaks == {}
        # One graph serves every layer; full recomputation adds the recomputed forward.
        assert graphs == (2 if recompute == "full" else 1)
        assert loss < 1e-6 and grads < 1e-6


def train_printing(job) -> tuple:
    """(`train`'s result, what the rank printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(job)
    return result, printed.getvalue()


def test_loss_head_compiles_to_one_graph_without_breaks(pool):
    # The whole logits and the vocabulary-parallel cross entropy, in one graph.
    runs = pool.run(compiled_against_eager, "compile_loss_head", {"cross_entropy_chunk_size": 0})
    for breaks, graphs, loss, grads in runs:
        assert breaks == {} and graphs == 1
        assert loss < 1e-6 and grads < 1e-6


def test_compiled_loss_head_refuses_a_chunked_head(corpus):  # noqa: F811
    job = make_job(corpus, 1, 1, training={"compile_loss_head": True},
                   model={"cross_entropy_chunk_size": 64})  # fmt: skip
    with pytest.raises(ValueError, match="--cross-entropy-chunk-size must be 0 or unset, got 64"):
        job.validate(1)


LAYOUTS = {
    # TP=2 + SP x PP=2, full recomputation, the distributed optimizer: one layer a rank.
    "tp2-sp-pp2": dict(pp=2, model={"recompute_granularity": "full"}),
    # TP=2 + SP x DP=2 under FSDP2 (compiled layers inside its per-layer shards): two layers.
    # TP=2 + SP x DP=2 with the loss head compiled too (the whole logits): two layers.
    "tp2-sp-head": dict(pp=1, training={"compile_loss_head": True}),
    "tp2-sp-fsdp2": dict(pp=1, ddp={"use_torch_fsdp2": True, "use_distributed_optimizer": False,
                                   "overlap_grad_reduce": False}),
}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_training_equals_eager(pool, corpus, layout):  # noqa: F811
    settings = LAYOUTS[layout]

    def job(compile: bool):
        model = {"sequence_parallel": True, **settings.get("model", {})}
        return make_job(
            corpus, 2, settings["pp"], train_iters=5, model=model,
            training={"compile": compile, "eval_iters": 0, "log_interval": 1,
                      **(settings.get("training", {}) if compile else {})},
            **({"ddp": settings["ddp"]} if "ddp" in settings else {}),
        )  # fmt: skip

    eager = pool.run(train, job(False))[0].losses
    runs = pool.run(train_printing, job(True))
    compiled = runs[0][0].losses
    assert sorted(compiled) == [1, 2, 3, 4, 5]
    for i in range(1, 6):
        assert compiled[i] == pytest.approx(eager[i], rel=1e-5, abs=0), i
    printed = [out for _, out in runs]
    compiled = f"{2 // settings['pp']} decoder layers"
    if "training" in settings:
        compiled += " and the loss head"
    assert printed[0].count(f"--compile: {compiled} compiled in ") == 1, printed[0]
    assert not any("--compile" in out for out in printed[1:])  # rank 0 only
