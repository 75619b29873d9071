"""A model family of one's own, through `--model-provider` and `pretrain(model_provider=...)`:
the trainer builds it, its forward step and datasets can be the caller's, and its
checkpoints record it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.checkpointing import read_full_state
from engine.models.families import FAMILIES
from engine.training.arguments import parse_args
from engine.training.data import build_datasets
from engine.training.step import forward_step
from tests.paths import REPO
from tests.rank_pool import module_pool
from tests.training.providers import OUT_BIAS
from tests.training.test_training import corpus, make_job  # noqa: F401 (a fixture)

pool = module_pool(4)
TINY = ["--model-preset", "tiny", "--train-iters", "1"]


@pytest.mark.parametrize("attribute", ["OUT_BIAS", "make_out_bias"])
def test_model_provider_registers_the_family(attribute):
    job = parse_args([*TINY, "--model-provider", f"tests.training.providers:{attribute}"])
    assert job.model.family == "llama-out-bias" and FAMILIES["llama-out-bias"] is OUT_BIAS


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tests.training.providers", "expected package.module:attribute"),
        ("tests.training.nowhere:X", "cannot import tests.training.nowhere"),
        ("tests.training.providers:MISSING", "has no 'MISSING'"),
        ("tests.training.providers:NOT_A_FAMILY", "gave a int, not a ModelFamily"),
    ],
)
def test_a_bad_model_provider_is_a_usage_error(spec, message, capsys):
    with pytest.raises(SystemExit) as error:
        parse_args([*TINY, "--model-provider", spec])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_a_flag_the_family_does_not_use_is_an_error(capsys):
    argv = [*TINY, "--model-provider", "tests.training.providers:OUT_BIAS"]
    with pytest.raises(SystemExit):
        parse_args([*argv, "--rotary-base", "500000"])
    assert "--rotary-base: not used by model family 'llama-out-bias'" in capsys.readouterr().err
    assert parse_args(argv).model.rotary_base == 10000.0  # not given: no error


def train_with_providers(job) -> dict:
    """`pretrain` with every provider given: counts the calls of the caller's pieces."""
    from engine.training import pretrain

    calls = {"forward": 0, "datasets": 0}

    def counting_forward_step(data_iterator, model):
        calls["forward"] += 1
        return forward_step(data_iterator, model)

    def datasets(job, global_batch_size, train_iters, tokenizer):
        calls["datasets"] += 1
        return build_datasets(job, global_batch_size, train_iters, tokenizer)

    result = pretrain(job, OUT_BIAS, counting_forward_step, datasets)
    return {"calls": calls, "losses": result.losses, "checkpoint": result.checkpoint}


def test_pretrain_takes_the_callers_model_forward_step_and_datasets(pool, corpus, tmp_path):  # noqa: F811
    job = make_job(corpus, 2, 2, train_iters=3, training={"eval_iters": 0},
                   checkpoint={"save": str(tmp_path)})  # fmt: skip
    for result in pool.run(train_with_providers, job):
        assert result["calls"]["datasets"] == 1
        # global batch 8 = micro batch 2 x 4 microbatches at DP=1, for 3 iterations
        assert result["calls"]["forward"] == 3 * 4
        assert len(result["losses"]) == 3
    metadata = json.loads((tmp_path / "iter_0000003" / "metadata.json").read_text())
    assert metadata["model"]["family"] == "llama-out-bias"
    saved = read_full_state(tmp_path / "iter_0000003")["model"]
    assert {f"layers.{n}.attention.out.bias" for n in range(2)} <= saved.keys()


def torchrun_pretrain_at_pp2(provider: str, data_prefix: str, directory) -> dict:
    """What a user types: ``torchrun examples/pretrain.py --model-provider PROVIDER ...`` on 2
    ranks at PP=2 for 3 iterations, saving into ``directory / "ckpt"``; returns the
    checkpoint's metadata."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--standalone", str(REPO / "examples" / "pretrain.py"),
        "--model-provider", provider, "--model-preset", "tiny",
        "--vocab-size", "256", "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--seq-length", "32", "--train-iters", "3",
        "--eval-iters", "0", "--log-interval", "1", "--lr", "1e-3",
        "--data-path", data_prefix, "--split", "90,5,5", "--num-workers", "0",
        "--save", str(directory / "ckpt"),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, cwd=directory, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "iteration 3/3" in run.stdout
    return json.loads((directory / "ckpt" / "iter_0000003" / "metadata.json").read_text())


def test_examples_pretrain_trains_a_provided_family_at_pp2(corpus, tmp_path):  # noqa: F811
    metadata = torchrun_pretrain_at_pp2("tests.training.providers:OUT_BIAS", corpus, tmp_path)
    assert metadata["model"]["family"] == "llama-out-bias"


def test_the_log_line_takes_flops_per_token_from_the_family():
    import dataclasses

    from engine.models import ModelConfig, register_family
    from engine.training.metrics import IntervalMeter

    register_family(
        dataclasses.replace(OUT_BIAS, name="counted", flops_per_token=lambda c, s: 10**9)
    )
    config = ModelConfig.from_preset("tiny", family="counted")
    meter = IntervalMeter(config, 2048, world_size=8, peak_tflops=989)
    meter.add(loss=2.0, grad_norm=1.0, tokens=8 * 4096, seconds=1.0)
    entry = meter.summary(1, 10, lr=1e-4, loss_scale=1.0, skipped_steps=0, nan_iterations=0,
                          memory=("mem", 1.0))  # fmt: skip
    assert entry.tflops_per_device == pytest.approx(4096 * 1e9 / 1e12)
