"""FSDP2 (``--use-torch-fsdp2``) through the trainer, on real gloo ranks: the byte-token corpus
and tiny LLaMA of `tests.training.test_training`.

- DP=2, DP=4, TP2+SP x DP2, PP2 x DP2 (also interleaved) and TP2 x PP2 x DP2, with gradient
  accumulation over microbatches and with recomputation: the losses of 5 iterations equal
  one rank's (float32, rtol 1e-5), and bf16 tracks them;
- weights, gradients and optimizer state per rank are 1/DP of the replicated figure;
- checkpoints: exact resume at TP2 x DP2, and FSDP2 <-> ZeRO-1 both ways;
- FSDP2 with the distributed optimizer (two owners of the same sharding) is refused before
  any rank starts."""

from __future__ import annotations

import pytest
import torch

from engine.training.arguments import parse_args
from tests.rank_pool import RankPool, module_pool
from tests.training.test_training import corpus, make_job, solo, train  # noqa: F401 (fixtures)

pool = module_pool(4)
ITERS = 5


def fsdp_job(corpus: str, tp: int, **sections):  # noqa: F811
    ddp = {"use_torch_fsdp2": True, "use_distributed_optimizer": False,
           "overlap_grad_reduce": False, **sections.pop("ddp", {})}  # fmt: skip
    training = {"eval_iters": 0, **sections.pop("training", {})}
    return make_job(corpus, tp, 1, ITERS, ddp=ddp, training=training, **sections)


def losses(result) -> torch.Tensor:
    return torch.tensor([result.losses[i] for i in sorted(result.losses)], dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(solo, corpus):  # noqa: F811
    return solo.run(train, make_job(corpus, 1, 1, ITERS, training={"eval_iters": 0}))[0]


@pytest.mark.parametrize(
    "tp, model, micro_batch, every",
    [(1, {}, 2, False), (1, {}, 1, False), (1, {}, 1, True),
     (2, {"sequence_parallel": True}, 2, False)],
    ids=["dp4", "dp4-two-microbatches", "dp4-reduce-every-microbatch", "tp2-sp-dp2"],
)  # fmt: skip
def test_fsdp2_matches_one_rank(pool, corpus, reference, tp, model, micro_batch, every):  # noqa: F811
    job = fsdp_job(corpus, tp, model=model, training={"micro_batch_size": micro_batch},
                   ddp={"fsdp_reduce_every_microbatch": every})  # fmt: skip
    result = pool.run(train, job)[0]
    assert sorted(result.losses) == list(range(1, ITERS + 1))
    torch.testing.assert_close(losses(result), losses(reference), rtol=1e-5, atol=0)


def test_fsdp2_at_dp2_matches_one_rank(corpus, reference):  # noqa: F811
    ranks = RankPool(2)
    try:
        result = ranks.run(train, fsdp_job(corpus, 1))[0]
    finally:
        ranks.close()
    torch.testing.assert_close(losses(result), losses(reference), rtol=1e-5, atol=0)


def test_fsdp2_bf16_tracks_fp32(pool, corpus, reference):  # noqa: F811
    result = pool.run(train, fsdp_job(corpus, 1, optimizer={"bf16": True}))[0]
    torch.testing.assert_close(losses(result), losses(reference), rtol=0.03, atol=0)


def test_fsdp2_fp16_tracks_zero1_fp16(pool, corpus):  # noqa: F811
    """fp16 with the dynamic loss scale: the same overflow-skipped first steps as ZeRO-1's
    fp16 run, then the same curve (fp16 compute over float32 sharded weights)."""
    fp16 = {"fp16": True}
    result = pool.run(train, fsdp_job(corpus, 1, optimizer=fp16))[0]
    zero1 = pool.run(train, make_job(corpus, 1, 1, ITERS, optimizer=fp16,
                                     training={"eval_iters": 0}))[0]  # fmt: skip
    assert result.skipped_steps == zero1.skipped_steps
    torch.testing.assert_close(losses(result), losses(zero1), rtol=0.03, atol=0)


def shard_bytes(lora_rank: int | None) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes on this rank (FSDP2 at DP=4), with
    LoRA adapters of ``lora_rank`` on a frozen base or without."""
    import torch.distributed as dist

    from engine import parallel_state
    from engine.distributed.config import DistributedDataParallelConfig
    from engine.distributed.fsdp import FullyShardedDataParallel
    from engine.models import LlamaModel, ModelConfig
    from engine.optimizer import build_optimizer
    from engine.optimizer.config import OptimizerConfig
    from engine.peft import LoraConfig, apply_lora

    parallel_state.initialize_model_parallel()
    try:
        chunk = LlamaModel(ModelConfig.from_preset("tiny"))
        if lora_rank is not None:
            apply_lora(chunk, LoraConfig(rank=lora_rank))
        model = FullyShardedDataParallel(chunk, DistributedDataParallelConfig(use_torch_fsdp2=True))
        optimizer = build_optimizer(OptimizerConfig(lr=1e-3), [model])
        tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
        model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        optimizer.step()  # creates Adam's moments
        params = list(model.module.parameters())
        trained = [p for p in params if p.requires_grad]
        moments = [t for state in optimizer.optimizer.state.values() for k, t in state.items()
                   if k in ("exp_avg", "exp_avg_sq")]  # fmt: skip
        return {
            "full": sum(p.numel() for p in params) * 4,
            "weights": sum(p.to_local().numel() for p in params) * 4,
            "trained": sum(p.numel() for p in trained) * 4,
            "grads": sum(p.main_grad.numel() for p in trained) * 4,
            "main": sum(shard.main_param.numel() for shard in optimizer.shards) * 4,
            "moments": sum(t.numel() for t in moments) * 4,
            "rank": dist.get_rank(),
        }
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("lora_rank", [None, 8], ids=["full", "lora"])
def test_fsdp2_holds_a_quarter_per_rank_at_dp4_as_the_plan_says(pool, lora_rank):
    """Counted on each rank: weights, gradients and Adam's moments are 1/4 of the replicated
    float32 figures (FSDP cuts each parameter's rows as torch.chunk does: within a row of
    each), and the plan's per-rank figures equal them within that padding. With LoRA the
    frozen base is sharded too, and only the adapters have gradients and moments."""
    from engine.planning.cost_model import plan

    per_rank = pool.run(shard_bytes, lora_rank)
    full, trained = per_rank[0]["full"], per_rank[0]["trained"]
    assert (trained < full / 10) if lora_rank else (trained == full)
    lora = [] if lora_rank is None else ["--lora-rank", str(lora_rank)]
    job = parse_args(["--model-preset", "tiny", "--use-torch-fsdp2", "--seq-length", "16",
                      "--train-iters", "1", *lora],
                     world_size=4)  # fmt: skip
    planned = plan(job, 4).ranks[0]
    for r in per_rank:
        assert r["grads"] == r["main"] and r["moments"] == 2 * r["grads"], r
        assert abs(r["weights"] - full / 4) <= full * 0.02, r
        assert abs(r["grads"] - trained / 4) <= trained * 0.02 + 4 * 64, r
        assert abs(planned.weight_bytes - r["weights"]) <= full * 0.02
        assert abs(planned.grad_bytes - r["grads"]) <= trained * 0.02 + 4 * 64
        assert abs(planned.optimizer_bytes - r["moments"]) <= 2 * (trained * 0.02 + 4 * 64)
    assert sum(r["weights"] for r in per_rank) == full
    assert sum(r["grads"] for r in per_rank) == trained
    assert planned.weight_bytes == -(-full // 16) * 4  # ceil(parameters / 4) float32 values


def test_fsdp2_with_the_distributed_optimizer_is_refused_up_front(capsys):
    base = ["--model-preset", "tiny", "--train-iters", "1", "--data-path", "x",
            "--use-torch-fsdp2"]  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args([*base, "--use-distributed-optimizer"], world_size=4)
    assert "drop --use-distributed-optimizer" in capsys.readouterr().err
    assert parse_args([*base, "--lora-rank", "8"], world_size=4).lora.rank == 8
    assert parse_args(base, world_size=4).ddp.use_torch_fsdp2


# Checkpoints ---------------------------------------------------------------------------------

TP2_SP = {"sequence_parallel": True}


@pytest.fixture(scope="module")
def uninterrupted(pool, corpus):  # noqa: F811
    """FSDP2 at TP2 x DP2 for 5 iterations."""
    return pool.run(train, fsdp_job(corpus, 2, model=TP2_SP))[0]


def stopped_at_3(pool, corpus: str, save, fsdp: bool) -> None:  # noqa: F811
    sections = {"checkpoint": {"save": str(save)}, "training": {"exit_interval": 3}}
    if fsdp:
        job = fsdp_job(corpus, 2, model=TP2_SP, **sections)
    else:
        job = make_job(corpus, 2, 1, ITERS, model=TP2_SP, training={"eval_iters": 0,
                       "exit_interval": 3}, checkpoint={"save": str(save)})  # fmt: skip
    assert all(r.iteration == 3 for r in pool.run(train, job))


def test_fsdp2_resumes_bit_for_bit(pool, corpus, uninterrupted, tmp_path):  # noqa: F811
    stopped_at_3(pool, corpus, tmp_path, fsdp=True)
    names = sorted(p.name for p in (tmp_path / "iter_0000003").glob("model_*"))
    assert names == [f"model_tp0{t}_pp00_dp0{d}.safetensors" for t in (0, 1) for d in (0, 1)]
    resumed = pool.run(train, fsdp_job(corpus, 2, model=TP2_SP,
                                       checkpoint={"load": str(tmp_path)}))[0]  # fmt: skip
    assert resumed.losses == {i: uninterrupted.losses[i] for i in (4, 5)}


@pytest.mark.parametrize("saved_with, resumed_with", [("fsdp2", "zero1"), ("zero1", "fsdp2")])
def test_checkpoints_move_between_fsdp2_and_zero1(
    pool,
    corpus,  # noqa: F811
    uninterrupted,
    tmp_path,
    saved_with,
    resumed_with,  # noqa: F811
):
    """Weights, Adam moments, schedule and data position (the FSDP2 and ZeRO-1 runs equal one
    rank, so each continues the other's curve)."""
    stopped_at_3(pool, corpus, tmp_path, fsdp=saved_with == "fsdp2")
    load = {"checkpoint": {"load": str(tmp_path)}}
    if resumed_with == "fsdp2":
        job = fsdp_job(corpus, 2, model=TP2_SP, **load)
    else:
        job = make_job(corpus, 2, 1, ITERS, model=TP2_SP, training={"eval_iters": 0}, **load)
    resumed = pool.run(train, job)[0]
    assert sorted(resumed.losses) == [4, 5]
    for i in (4, 5):
        assert resumed.losses[i] == pytest.approx(uninterrupted.losses[i], rel=1e-5), i


# Pipelines -----------------------------------------------------------------------------------


def test_fsdp2_with_pipeline_stages_matches_one_rank(pool, corpus, reference):  # noqa: F811
    """PP2 x DP2: each stage's layers sharded over its DP group; gradient reduction once per
    step over the 4 microbatches of a replica."""
    job = fsdp_job(corpus, 1, parallel={"pipeline_model_parallel_size": 2},
                   training={"micro_batch_size": 1})  # fmt: skip
    result = pool.run(train, job)[0]
    torch.testing.assert_close(losses(result), losses(reference), rtol=1e-5, atol=0)


def test_fsdp2_at_tp2_pp2_dp2_matches_one_rank(corpus, reference):  # noqa: F811
    ranks = RankPool(8)
    try:
        pp2 = {"pipeline_model_parallel_size": 2}
        result = ranks.run(train, fsdp_job(corpus, 2, model=TP2_SP, parallel=pp2))[0]
        bf16_job = fsdp_job(corpus, 2, model=TP2_SP, parallel=pp2, optimizer={"bf16": True})
        bf16 = ranks.run(train, bf16_job)[0]
    finally:
        ranks.close()
    torch.testing.assert_close(losses(result), losses(reference), rtol=1e-5, atol=0)
    # bf16 compute over float32 sharded weights, bf16 messages between the stages.
    torch.testing.assert_close(losses(bf16), losses(reference), rtol=0.03, atol=0)


def test_the_trainer_says_which_mechanism_owns_the_job():
    from engine.training.loop import data_parallel_owner

    base = ["--model-preset", "tiny", "--train-iters", "1", "--data-path", "x"]
    assert data_parallel_owner(parse_args(base + ["--use-torch-fsdp2"])).startswith("FSDP2")
    assert "ZeRO-1" in data_parallel_owner(parse_args(base + ["--use-distributed-optimizer"]))
    assert "replicated" in data_parallel_owner(parse_args(base))


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_fsdp2_with_recompute_matches_one_rank(pool, corpus, reference, granularity):  # noqa: F811
    """Recomputation re-runs a layer (or its core attention) in backward: FSDP2 gathers the
    layer's weights again for it."""
    job = fsdp_job(corpus, 1, model={"recompute_granularity": granularity})
    result = pool.run(train, job)[0]
    torch.testing.assert_close(losses(result), losses(reference), rtol=1e-5, atol=0)


def test_fsdp2_with_an_interleaved_pipeline_matches_one_rank(pool, solo, corpus):  # noqa: F811
    """PP2 x DP2, two model chunks per pipeline rank (4 layers), each chunk sharded on its own."""
    four = {"num_layers": 4}
    job = fsdp_job(corpus, 1, model=four, training={"micro_batch_size": 1},
                   parallel={"pipeline_model_parallel_size": 2,
                             "virtual_pipeline_model_parallel_size": 2})  # fmt: skip
    result = pool.run(train, job)[0]
    one = solo.run(train, make_job(corpus, 1, 1, ITERS, model=four, training={"eval_iters": 0}))[0]
    torch.testing.assert_close(losses(result), losses(one), rtol=1e-5, atol=0)


def test_an_fsdp2_checkpoint_reshards_to_other_tp_and_dp_sizes(
    pool,
    corpus,  # noqa: F811
    uninterrupted,
    tmp_path,
):
    """Saved at TP2 x DP2, resumed under FSDP2 at TP1 x DP4: each rank takes other rows of
    other TP shards."""
    stopped_at_3(pool, corpus, tmp_path, fsdp=True)
    resumed = pool.run(train, fsdp_job(corpus, 1, checkpoint={"load": str(tmp_path)}))[0]
    assert sorted(resumed.losses) == [4, 5]
    for i in (4, 5):
        assert resumed.losses[i] == pytest.approx(uninterrupted.losses[i], rel=1e-5), i
