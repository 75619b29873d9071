"""LoRA through the trainer (``--lora-rank``), on real gloo ranks: the frozen base trains no
parameter, DDP buckets and the optimizer steps the adapters only, and every parallel layout
gives the single process' losses and adapters.

- TP=2 with sequence parallelism (DP=4), PP=2 (DP=4) and TP=2 x PP=2 x DP=2 with the
  distributed optimizer: per-iteration losses and the trained adapters (gathered over TP,
  by PEFT name) equal one process' within 1e-5; every base shard is bit-identical before and
  after training and has no gradient;
- bf16 base: the optimizer holds exactly 12 bytes per adapter parameter (float32 main copy
  and two Adam moments), DDP's gradient buffer exactly the adapters' elements;
- the flags: ``--lora-*`` build the config, a sibling without ``--lora-rank``, ``--save`` and
  ``--load`` without ``--finetune`` are refused before anything starts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.peft import LoraConfig, is_lora_parameter, lora_state
from engine.training.arguments import parse_args
from tests.rank_pool import module_pool
from tests.training.test_training import corpus, make_job  # noqa: F401 (a fixture)

pool8 = module_pool(8)
solo = module_pool(1)

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("qkv", "out", "gate_up", "down"))
ITERS = 3


def lora_job(corpus: str, tp: int, pp: int, sequence_parallel: bool = False):  # noqa: F811
    job = make_job(corpus, tp, pp, train_iters=ITERS)
    model = dataclasses.replace(job.model, sequence_parallel=sequence_parallel)
    training = dataclasses.replace(job.training, eval_iters=0, log_interval=ITERS)
    return dataclasses.replace(job, model=model, training=training, lora=LORA)


def train_with_lora(job) -> dict:
    """Train; return the losses, the adapters (full, by PEFT name) and whether each base
    shard of this rank is unchanged and without a gradient."""
    from engine.training.loop import pretrain
    from engine.training.step import forward_step

    seen: dict[int, object] = {}

    def recording_step(data_iterator, model):
        # The chunks as the trainer built them: their base shards before the first update.
        if id(model) not in seen:
            seen[id(model)] = (model, {n: p.detach().clone()
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
        result = pretrain(job, forward_step_func=recording_step)
    finally:
        loop._loop = original_loop
    base_unchanged, base_without_grad, adapters_moved = True, True, False
    for model, before in seen.values():
        for name, param in model.named_parameters():
            if is_lora_parameter(param):
                adapters_moved |= not torch.equal(param, before[name])
            else:
                base_unchanged &= torch.equal(param, before[name])
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
    "tp, pp, sequence_parallel", [(2, 1, True), (1, 2, False), (2, 2, False)],
    ids=["tp2-sp-dp4", "pp2-dp4", "tp2-pp2-dp2-zero1"],
)  # fmt: skip
def test_lora_training_matches_one_process(pool8, corpus, reference, tp, pp, sequence_parallel):  # noqa: E501, F811
    results = pool8.run(train_with_lora, lora_job(corpus, tp, pp, sequence_parallel))
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
        (["--lora-rank", "4", "--save", "out"], "LoRA adapters are not saved in checkpoints"),
        (["--lora-rank", "4", "--load", "base"], "--load with --lora-rank needs --finetune"),
    ]:
        with pytest.raises(SystemExit):
            parse_args([*FLAGS, *extra], world_size=1)  # the trainer's up-front checks
        assert message in capsys.readouterr().err, extra
    assert parse_args([*FLAGS, "--lora-rank", "4", "--load", "base", "--finetune"],
                      world_size=1).lora.rank == 4  # fmt: skip
