"""LoRA through the trainer (``--lora-rank``), on real gloo ranks: the frozen base trains no
parameter, DDP buckets and the optimizer steps the adapters only, and every parallel layout
gives the single process' losses and adapters.

- TP=2 with sequence parallelism and full recompute (DP=4), PP=2 with selective recompute
  (DP=4) and TP=2 x PP=2 x DP=2 with the distributed optimizer: per-iteration losses and the
  trained adapters (gathered over TP, by PEFT name) equal one process' within 1e-5; every base
  shard is bit-identical before and after training and has no gradient; SFT data at TP=2 + SP
  and PP=2 (DP=1) likewise;
- bf16 base: the optimizer holds exactly 12 bytes per adapter parameter (float32 main copy
  and two Adam moments), DDP's gradient buffer exactly the adapters' elements;
- the flags: ``--lora-*`` build the config, a sibling without ``--lora-rank``, ``--save`` and
  ``--load`` without ``--finetune`` are refused before anything starts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.checkpointing import read_full_state
from engine.peft import LoraConfig, is_lora_parameter, lora_state
from engine.training.arguments import parse_args
from tests.rank_pool import module_pool
from tests.training.test_training import corpus, make_job, sft_corpus  # noqa: F401 (fixtures)

pool8 = module_pool(8)
solo = module_pool(1)

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("qkv", "out", "gate_up", "down"))
ITERS = 3


def lora_job(corpus: str, tp: int, pp: int, sequence_parallel: bool = False,  # noqa: F811
             recompute: str | None = None):  # fmt: skip
    job = make_job(corpus, tp, pp, train_iters=ITERS)
    model = dataclasses.replace(job.model, sequence_parallel=sequence_parallel,
                                recompute_granularity=recompute)  # fmt: skip
    training = dataclasses.replace(job.training, eval_iters=0, log_interval=ITERS)
    return dataclasses.replace(job, model=model, training=training, lora=LORA)


def sft_lora_job(prefix: str, tp: int, pp: int, sequence_parallel: bool = False,
                 recompute: str | None = None):  # fmt: skip
    """`lora_job` on SFT data (loss on the answers only), trained by `finetune`."""
    job = lora_job(prefix, tp, pp, sequence_parallel, recompute)
    data = dataclasses.replace(job.data, data_path=[prefix], split="80,20,0", sft=True)
    return dataclasses.replace(job, data=data)


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: its rows of an FSDP2 DTensor (comparing DTensors is
    a collective, and the process groups are gone when the results are read)."""
    return (param.to_local() if hasattr(param, "to_local") else param).detach()


def train_with_lora(job) -> dict:
    """Train (SFT data: `finetune`); return the losses, the adapters (full, by PEFT name) and
    whether each base shard of this rank is unchanged and without a gradient."""
    from engine.training.loop import finetune, pretrain
    from engine.training.step import forward_step

    seen: dict[int, object] = {}

    def recording_step(data_iterator, model):
        # The chunks as the trainer built them: their base shards before the first update.
        if id(model) not in seen:
            seen[id(model)] = (model, {n: local(p).clone()
                                       for n, p in model.named_parameters()})  # fmt: skip
        return forward_step(data_iterator, model)

    adapters: dict[str, torch.Tensor] = {}

    def gather_adapters():  # while the process groups still exist: after the last step
        for model, _ in seen.values():
            adapters.update(lora_state(model.module))

    from engine.training import loop

    original_loop = loop._loop

    def loop_then_gather(run, writer, result, exits):
        original_loop(run, writer, result, exits)
        gather_adapters()

    loop._loop = loop_then_gather
    try:
        result = (finetune if job.data.sft else pretrain)(job, forward_step_func=recording_step)
    finally:
        loop._loop = original_loop
    base_unchanged, base_without_grad, adapters_moved = True, True, False
    for model, before in seen.values():
        for name, param in model.named_parameters():
            if is_lora_parameter(param):
                adapters_moved |= not torch.equal(local(param), before[name])
            else:
                base_unchanged &= torch.equal(local(param), before[name])
                base_without_grad &= param.grad is None and not param.requires_grad
    return {
        "losses": [result.losses[i] for i in range(1, ITERS + 1)],
        "adapters": adapters,
        "base_unchanged": base_unchanged,
        "base_without_grad": base_without_grad,
        "adapters_moved": adapters_moved,
    }


@pytest.fixture(scope="module")
def reference(solo, corpus) -> dict:  # noqa: F811
    out = solo.run(train_with_lora, lora_job(corpus, 1, 1))[0]
    assert out["adapters_moved"] and out["base_unchanged"] and out["base_without_grad"]
    assert len(out["adapters"]) == 2 * 7 * 2  # A and B of 7 modules in each of 2 layers
    return out


@pytest.mark.parametrize(
    "tp, pp, sequence_parallel, recompute",
    [(2, 1, True, "full"), (1, 2, False, "selective"), (2, 2, False, None)],
    ids=["tp2-sp-dp4-full-recompute", "pp2-dp4-selective-recompute", "tp2-pp2-dp2-zero1"],
)  # fmt: skip
def test_lora_training_matches_one_process(pool8, corpus, reference, tp, pp, sequence_parallel,  # noqa: F811
                                           recompute):  # fmt: skip
    results = pool8.run(train_with_lora, lora_job(corpus, tp, pp, sequence_parallel, recompute))
    for rank, out in enumerate(results):
        assert out["base_unchanged"] and out["base_without_grad"], f"rank {rank}"
        assert out["losses"] == results[0]["losses"]
    torch.testing.assert_close(
        torch.tensor(results[0]["losses"], dtype=torch.float64),
        torch.tensor(reference["losses"], dtype=torch.float64), rtol=1e-5, atol=0,
    )  # fmt: skip
    adapters = {}
    for out in results:  # each pipeline stage holds its own layers' adapters
        adapters.update(out["adapters"])
    assert sorted(adapters) == sorted(reference["adapters"])
    for name, tensor in adapters.items():
        torch.testing.assert_close(tensor, reference["adapters"][name], rtol=1e-5, atol=1e-6,
                                   msg=name)  # fmt: skip


pool2 = module_pool(2)


@pytest.mark.parametrize(
    "tp, pp, sequence_parallel, recompute", [(2, 1, True, "full"), (1, 2, False, None)],
    ids=["tp2-sp-full-recompute", "pp2"],
)  # fmt: skip
def test_lora_sft_matches_one_process(pool2, solo, sft_corpus, tp, pp, sequence_parallel,  # noqa: F811
                                      recompute):  # fmt: skip
    """SFT (loss on the answers only) at DP=1: its shuffled sampler buckets samples by DP rank
    (as Megatron's), so only layouts of the same DP size see the same microbatches."""
    one = solo.run(train_with_lora, sft_lora_job(sft_corpus, 1, 1))[0]
    results = pool2.run(train_with_lora, sft_lora_job(sft_corpus, tp, pp, sequence_parallel,
                                                      recompute))  # fmt: skip
    for out in results:
        assert (
            out["base_unchanged"]
            and out["base_without_grad"]
            and out["losses"] == results[0]["losses"]
        )
    torch.testing.assert_close(
        torch.tensor(results[0]["losses"], dtype=torch.float64),
        torch.tensor(one["losses"], dtype=torch.float64), rtol=1e-5, atol=0,
    )  # fmt: skip
    adapters = {k: v for out in results for k, v in out["adapters"].items()}
    for name, tensor in adapters.items():
        torch.testing.assert_close(tensor, one["adapters"][name], rtol=1e-5, atol=1e-6, msg=name)


def optimizer_and_buffers(job) -> dict:
    """Build the run (bf16 base), take one optimizer step on a real batch; count state."""
    from engine.device import init_distributed
    from engine.training.state import TrainingRun

    device = init_distributed()
    run = TrainingRun(job, device)
    try:
        from engine.training.data import build_datasets

        run.datasets = build_datasets(job, run.global_batch, run.train_iters, run.tokenizer)
        run.run_schedule(run.iterators(run.datasets.train, 0), forward_only=False)
        run.optimizer.step()
        adapters = [p for c in run.chunks for p in c.parameters() if is_lora_parameter(p)]
        base = [p for c in run.chunks for p in c.parameters() if not is_lora_parameter(p)]
        return {
            "state_bytes": run.optimizer.state_bytes(),
            "adapter_numel": sum(p.numel() for p in adapters),
            "adapter_dtype": str(adapters[0].dtype),
            "base_dtype": str(base[0].dtype),
            "buffer_numel": sum(b.numel for c in run.chunks for b in c.buffers_by_dtype.values()),
            "base_grads": sum(p.grad is not None for p in base),
        }
    finally:
        from engine import parallel_state

        parallel_state.destroy_model_parallel()


def test_optimizer_state_is_12_bytes_per_adapter_parameter(solo, corpus):  # noqa: F811
    job = lora_job(corpus, 1, 1)
    job = dataclasses.replace(job, optimizer=dataclasses.replace(job.optimizer, bf16=True))
    out = solo.run(optimizer_and_buffers, job)[0]
    assert out["base_dtype"] == "torch.bfloat16"
    assert out["state_bytes"] == 12 * out["adapter_numel"]  # fp32 main + exp_avg + exp_avg_sq
    assert out["buffer_numel"] == out["adapter_numel"] and out["base_grads"] == 0


FLAGS = ["--model-preset", "tiny", "--seq-length", "32", "--train-iters", "1"]


def test_flags_build_the_config_and_bad_combinations_are_refused(capsys):
    job = parse_args([*FLAGS, "--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout",
                      "0.05", "--lora-target-modules", "q_proj,v_proj"])  # fmt: skip
    assert job.lora == LoraConfig(16, 32.0, 0.05, ("q_proj", "v_proj"))
    assert parse_args(FLAGS).lora is None
    for extra, message in [
        (["--lora-alpha", "8"], "--lora-alpha need --lora-rank"),
        (["--lora-rank", "4", "--lora-target-modules", "qkv,attn"], "--lora-target-modules attn"),
        (
            ["--pretrained-checkpoint", "base"],
            "--pretrained-checkpoint is for a LoRA run: give --lora-rank",
        ),
    ]:
        with pytest.raises(SystemExit):
            parse_args([*FLAGS, *extra], world_size=1)  # the trainer's up-front checks
        assert message in capsys.readouterr().err, extra
    job = parse_args([*FLAGS, "--lora-rank", "4", "--pretrained-checkpoint", "base", "--save",
                      "out", "--load", "out"], world_size=1)  # fmt: skip
    assert (job.checkpoint.pretrained_checkpoint, job.lora.rank) == ("base", 4)


# Checkpoints ----------------------------------------------------------------------------------


def train_job(job) -> dict[int, float]:
    from engine.training.loop import pretrain

    return pretrain(job).losses


def with_checkpoints(job, **checkpoint):
    return dataclasses.replace(job, checkpoint=dataclasses.replace(job.checkpoint, **checkpoint))


@pytest.fixture(scope="module")
def bases(solo, corpus, tmp_path_factory):  # noqa: F811
    """Two base checkpoints of the tiny model (full training runs of 3 and 4 steps)."""
    out = []
    for steps in (3, 4):
        save = str(tmp_path_factory.mktemp(f"base{steps}"))
        job = make_job(corpus, 1, 1, train_iters=steps)
        job = dataclasses.replace(job, training=dataclasses.replace(job.training, eval_iters=0))
        solo.run(train_job, with_checkpoints(job, save=save))
        out.append(save)
    return out


def resumes_and_reshards(pool8, solo, job, tmp_path) -> None:
    """LoRA ``job`` on a base checkpoint, 4 steps: stopped at 2 and resumed, iterations 3 and 4
    repeat the uninterrupted run exactly; the checkpoint holds adapters only; resharded to one
    process (DDP and ZeRO-1) the adapters continue within float32 tolerance."""
    job = dataclasses.replace(job, training=dataclasses.replace(job.training, train_iters=4))
    uninterrupted = pool8.run(train_job, job)[0]
    stop = with_checkpoints(job, save=str(tmp_path))
    stop = dataclasses.replace(stop, training=dataclasses.replace(job.training, exit_interval=2))
    pool8.run(train_job, stop)
    saved = read_full_state(tmp_path / "iter_0000002")["model"]
    assert saved and all(".lora_A" in name or ".lora_B" in name for name in saved)
    assert len(saved) == 2 * 7 * 2  # A and B of 7 modules, 2 layers: no base tensor
    resumed = pool8.run(train_job, with_checkpoints(job, load=str(tmp_path)))[0]
    assert resumed == {i: uninterrupted[i] for i in (3, 4)}
    one_rank = dataclasses.replace(job.parallel, tensor_model_parallel_size=1,
                                   pipeline_model_parallel_size=1)  # fmt: skip
    solo_job = dataclasses.replace(job, parallel=one_rank, ddp=lora_job("", 1, 1).ddp)
    one = solo.run(train_job, with_checkpoints(solo_job, load=str(tmp_path)))[0]
    for i in (3, 4):
        assert one[i] == pytest.approx(uninterrupted[i], rel=1e-5), i


def test_adapters_checkpoint_resume_bit_for_bit_and_reshard(pool8, solo, corpus, bases, tmp_path):  # noqa: E501, F811
    """At TP=2 x PP=2 x DP=2 with the distributed optimizer."""
    job = with_checkpoints(lora_job(corpus, 2, 2), pretrained_checkpoint=bases[0])
    resumes_and_reshards(pool8, solo, job, tmp_path)


def test_adapters_without_their_base_are_refused(solo, corpus, bases, tmp_path):  # noqa: F811
    job = with_checkpoints(lora_job(corpus, 1, 1), pretrained_checkpoint=bases[0])
    solo.run(train_job, with_checkpoints(job, save=str(tmp_path)))
    for base in (None, bases[1]):
        resume = with_checkpoints(job, load=str(tmp_path), pretrained_checkpoint=base)
        with pytest.raises(Exception, match="holds LoRA adapters trained on") as error:
            solo.run(train_job, resume)
        assert bases[0] in str(error.value) and str(base or "none") in str(error.value)


def fsdp_lora_job(corpus: str, tp: int, pp: int, sequence_parallel: bool = False):  # noqa: F811
    """`lora_job` with the adapters (and the frozen base) sharded by FSDP2."""
    job = lora_job(corpus, tp, pp, sequence_parallel)
    ddp = dataclasses.replace(job.ddp, use_torch_fsdp2=True, use_distributed_optimizer=False,
                              overlap_grad_reduce=False)  # fmt: skip
    return dataclasses.replace(job, ddp=ddp)


@pytest.mark.parametrize(
    "tp, pp, sequence_parallel", [(2, 1, True), (1, 2, False)], ids=["tp2-sp-dp4", "pp2-dp4"],
)  # fmt: skip
def test_lora_under_fsdp2_matches_one_process(pool8, corpus, reference, tp, pp,  # noqa: F811
                                              sequence_parallel):  # fmt: skip
    results = pool8.run(train_with_lora, fsdp_lora_job(corpus, tp, pp, sequence_parallel))
    for rank, out in enumerate(results):
        assert out["base_unchanged"] and out["base_without_grad"], f"rank {rank}"
    torch.testing.assert_close(
        torch.tensor(results[0]["losses"], dtype=torch.float64),
        torch.tensor(reference["losses"], dtype=torch.float64), rtol=1e-5, atol=0,
    )  # fmt: skip
    adapters = {k: v for out in results for k, v in out["adapters"].items()}
    assert sorted(adapters) == sorted(reference["adapters"])
    for name, tensor in adapters.items():
        torch.testing.assert_close(tensor, reference["adapters"][name], rtol=1e-5, atol=1e-6,
                                   msg=name)  # fmt: skip


def test_fsdp2_adapters_checkpoint_resume_bit_for_bit_and_reshard(pool8, solo, corpus, bases,  # noqa: F811
                                                                  tmp_path):  # fmt: skip
    """Under FSDP2 at TP=2 x PP=2 x DP=2 (the base loaded into FSDP's shards, the adapters
    saved from them); the checkpoint then continues in one process without FSDP."""
    job = with_checkpoints(fsdp_lora_job(corpus, 2, 2), pretrained_checkpoint=bases[0])
    resumes_and_reshards(pool8, solo, job, tmp_path)
