"""Context parallelism through the trainer (`engine.training.loop.pretrain`), on real gloo
ranks: the byte-token corpus and tiny LLaMA of `tests.training.test_training`, distributed
optimizer (ZeRO-1 over DP x CP) and overlapped reductions.

- CP2 x TP2 x DP2 (ring) and CP2 x TP2 x PP2 (all-to-all, sequence parallel) give the
  one-rank run's losses iteration for iteration; bf16 at CP2 tracks fp32;
- a checkpoint saved at CP=2 resumes at CP=1 and at CP=4 with the next losses of the run
  that never stopped (CP shards no weights: the checkpoint does not depend on it);
- ``torchrun examples/pretrain.py`` at CP2 x TP2 logs the one-process losses, and bad CP
  layouts are usage errors naming the flags before any rank starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.training.arguments import parse_args
from tests.paths import REPO
from tests.rank_pool import module_pool
from tests.training.test_training import (  # noqa: F401 (fixtures)
    LOG_LINE,
    corpus,
    make_job,
    sft_corpus,
    solo,
    train,
)

pool = module_pool(8)
ITERS = 4


def cp_job(corpus: str, tp: int, pp: int, cp: int, comm: str = "p2p", **sections):  # noqa: F811
    model = {"cp_comm_type": comm, **sections.pop("model", {})}
    parallel = {"context_parallel_size": cp, **sections.pop("parallel", {})}
    training = {"eval_interval": 2, **sections.pop("training", {})}
    return make_job(corpus, tp, pp, ITERS, model=model, parallel=parallel, training=training,
                    **sections)  # fmt: skip


def losses(result) -> torch.Tensor:
    return torch.tensor([result.losses[i] for i in sorted(result.losses)], dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(solo, corpus):  # noqa: F811
    return solo.run(train, cp_job(corpus, 1, 1, 1))[0]


@pytest.fixture(scope="module")
def stopped(pool, corpus, tmp_path_factory) -> Path:  # noqa: F811
    """CP2 x DP4 (ring) stopped by --exit-interval 2, which saves: returns --save."""
    save = tmp_path_factory.mktemp("cp_checkpoints")
    job = cp_job(corpus, 1, 1, 2, checkpoint={"save": str(save)}, training={"exit_interval": 2})
    assert all(result.iteration == 2 for result in pool.run(train, job))
    return save


def test_ring_with_zero1_matches_one_rank(pool, corpus, reference):  # noqa: F811
    result = pool.run(train, cp_job(corpus, 2, 1, 2))[0]
    assert sorted(result.losses) == [1, 2, 3, 4] and result.consumed_samples == 8 * ITERS
    torch.testing.assert_close(losses(result), losses(reference), rtol=1e-5, atol=0)
    validation = reference.evaluations[4]["loss"]
    assert result.evaluations[4]["loss"] == pytest.approx(validation, rel=1e-5)


def test_all_to_all_with_tp_sp_and_pp_matches_one_rank(pool, corpus, reference):  # noqa: F811
    job = cp_job(corpus, 2, 2, 2, "a2a", model={"sequence_parallel": True})
    result = pool.run(train, job)[0]
    torch.testing.assert_close(losses(result), losses(reference), rtol=1e-5, atol=0)


def test_bf16_tracks_fp32(pool, corpus, reference):  # noqa: F811
    result = pool.run(train, cp_job(corpus, 1, 1, 2, optimizer={"bf16": True}))[0]
    # bf16 keeps 8 bits of mantissa: loose agreement, the same curve.
    torch.testing.assert_close(losses(result), losses(reference), rtol=0.03, atol=0)


@pytest.mark.parametrize("cp", [1, 4])
def test_a_cp2_checkpoint_resumes_at_another_cp_size(pool, solo, corpus, stopped, reference, cp):  # noqa: F811
    """Weights, Adam moments (ZeRO-1 shards over DP x CP, resharded), schedule and data
    position: iterations 3 and 4 are the uninterrupted run's (CP2 equals one rank above)."""
    job = cp_job(corpus, 1, 1, cp, checkpoint={"load": str(stopped)})
    result = (solo if cp == 1 else pool).run(train, job)[0]
    assert sorted(result.losses) == [3, 4]
    for i in (3, 4):
        assert result.losses[i] == pytest.approx(reference.losses[i], rel=1e-5), i


def test_packed_sft_rows_at_cp2_tp2_pp2_match_one_rank(pool, solo, sft_corpus):  # noqa: F811
    """SFT rows of 256 tokens pack two or three conversations; document ids keep attention within
    each across the CP chunks (ring), as on one rank (DP=1 on both: SFT's sampler deals rows
    by DP rank)."""
    sft = {"data": {"data_path": [sft_corpus], "sft": True, "split": "80,20,0"},
           "training": {"seq_length": 256, "eval_iters": 0}}  # fmt: skip
    split = pool.run(train, cp_job(sft_corpus, 2, 2, 2, model={"sequence_parallel": True},
                                   **sft))[0]  # fmt: skip
    one = solo.run(train, cp_job(sft_corpus, 1, 1, 1, **sft))[0]
    torch.testing.assert_close(losses(split), losses(one), rtol=1e-5, atol=0)


# What a user types -----------------------------------------------------------------------


def torchrun_losses(nproc: int, corpus: str, tmp_path: Path, *flags: str) -> dict[int, float]:  # noqa: F811
    """``torchrun examples/pretrain.py`` on ``nproc`` ranks for 3 iterations: the log lines'
    losses."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--standalone", str(REPO / "examples" / "pretrain.py"), "--model-preset", "tiny-gqa",
        "--vocab-size", "256", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "32", "--train-iters", "3", "--eval-iters", "0", "--log-interval", "1",
        "--lr", "1e-3", "--data-path", corpus, "--split", "90,5,5", "--num-workers", "0", *flags,
    ]  # fmt: skip
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    found = [LOG_LINE.match(line) for line in run.stdout.splitlines()]
    return {int(m.group(1)): float(m.group(3)) for m in found if m}


def test_examples_pretrain_at_cp2_tp2_equals_one_process(corpus, tmp_path):  # noqa: F811
    """4 ranks: CP2 x TP2 with sequence parallelism, the ring (GQA: 8 query, 2 K/V heads)."""
    split = torchrun_losses(4, corpus, tmp_path, "--context-parallel-size", "2",
                            "--tensor-model-parallel-size", "2", "--sequence-parallel")  # fmt: skip
    one = torchrun_losses(1, corpus, tmp_path)
    assert sorted(split) == sorted(one) == [1, 2, 3]
    for i in (1, 2, 3):  # the log line prints 7 digits
        assert split[i] == pytest.approx(one[i], rel=2e-6), i


def _usage_error(capsys, argv: list[str], world_size: int) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, world_size=world_size)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


BASE = ["--model-preset", "tiny-gqa", "--train-iters", "1", "--data-path", "x"]


def test_bad_context_parallel_layouts_are_named_before_any_rank_starts(capsys):
    """`parse_args` runs before torch.distributed starts (examples/pretrain.py)."""
    message = _usage_error(capsys, [*BASE, "--context-parallel-size", "4", "--seq-length", "36"], 8)
    assert "--seq-length (36) must be divisible by 2 x --context-parallel-size (4) = 8" in message
    message = _usage_error(capsys, [*BASE, "--context-parallel-size", "2", "--seq-length", "36",
                                    "--tensor-model-parallel-size", "2", "--sequence-parallel"],
                           4)  # fmt: skip
    assert "2 x --context-parallel-size (2) x --tensor-model-parallel-size (2) = 8" in message
    # tiny-gqa: 8 query heads, 2 K/V heads; a2a at CP=4 cannot split 2 K/V heads.
    message = _usage_error(capsys, [*BASE, "--context-parallel-size", "4", "--seq-length", "32",
                                    "--cp-comm-type", "a2a"], 4)  # fmt: skip
    assert "the 2 K/V heads per TP rank" in message and "use --cp-comm-type p2p" in message
    message = _usage_error(capsys, [*BASE, "--context-parallel-size", "3", "--seq-length", "36"], 4)
    assert "world size (4) must be divisible by" in message
    assert "--context-parallel-size (3)" in message
    message = _usage_error(capsys, [*BASE, "--context-parallel-size", "2", "--seq-length", "32",
                                    "--attention-dropout", "0.1"], 2)  # fmt: skip
    assert "--attention-dropout (0.1) is not supported with --context-parallel-size (2)" in message
    message = _usage_error(capsys, [*BASE, "--context-parallel-size", "2", "--seq-length", "32",
                                    "--sft", "--attention-backend", "triton"], 2)  # fmt: skip
    assert "--sft packs documents, which ring attention" in message
    assert "use --cp-comm-type a2a or --attention-backend torch" in message
    job = parse_args([*BASE, "--context-parallel-size", "2", "--seq-length", "32"], world_size=8)
    assert job.parallel.context_parallel_size == 2 and job.data_parallel_size(8) == 4
