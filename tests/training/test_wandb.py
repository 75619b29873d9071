"""Weights & Biases logging (``--wandb-project``): a real 2-rank run (PP=2, so the loss is
computed on the last stage and rank 0 writes it) in W&B's offline mode, read back with W&B's own
reader of the run's transaction log (``wandb leet inspect --json``): the same scalars as the
TensorBoard event file at the same iterations, and the job's configuration. Without the package,
the flag is a usage error before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.training.arguments import parse_args
from engine.training.wandb_writer import wandb_dir
from tests.paths import REPO
from tests.rank_pool import module_pool
from tests.training.test_training import corpus, make_job  # noqa: F401 (fixture)

ITERS = 4
pool = module_pool(2)


def train_offline(job):
    """Runs on every rank: W&B offline and quiet, as a user without network would set it."""
    from engine.training.loop import pretrain

    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return pretrain(job)


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's ``.wandb`` log, decoded by W&B's CLI."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def logged(pool, corpus, tmp_path_factory):  # noqa: F811
    """(results, TensorBoard dir, W&B dir) of one run logging every iteration to both."""
    root = tmp_path_factory.mktemp("logged")
    training = {"train_iters": ITERS, "log_interval": 1, "eval_interval": 2, "eval_iters": 1,
                "tensorboard_dir": str(root / "tb"), "wandb_project": "engine-test",
                "wandb_exp_name": "pp2", "wandb_save_dir": str(root / "wandb")}  # fmt: skip
    results = pool.run(train_offline, make_job(corpus, 1, 2, training=training))
    return results, root / "tb", root / "wandb"


def test_wandb_history_holds_the_tensorboard_scalars_at_the_same_iterations(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, tb_dir, wandb_root = logged
    [run_dir] = (wandb_root / "wandb").glob("offline-run-*")  # one run: rank 0's
    records = wandb_records(run_dir)
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records
               if r["type"] == "history"}  # fmt: skip
    assert sorted(history) == list(range(1, ITERS + 1))

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "validation/loss", "test/ppl"} <= tags
    for step, row in history.items():
        assert {key for key in row if not key.startswith("_")} == {
            tag for tag in tags if any(e.step == step for e in events.Scalars(tag))
        }, f"iteration {step}"
    for tag in tags:
        for event in events.Scalars(tag):  # TensorBoard keeps float32, W&B float64
            assert history[event.step][tag] == pytest.approx(event.value, rel=1e-6), tag
    # Every iteration is its own log interval: the loss is that iteration's global loss.
    for step, row in history.items():
        assert row["train/loss"] == pytest.approx(results[0].losses[step], rel=1e-12)
    assert history[2]["validation/loss"] == pytest.approx(results[0].evaluations[2]["loss"])
    assert history[ITERS]["test/ppl"] == pytest.approx(results[0].test["ppl"])

    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert (run["project"], run["display_name"]) == ("engine-test", "pp2")
    config = run["config"]["update"]
    assert config["parallel"]["pipeline_model_parallel_size"] == 2
    assert config["training"]["wandb_project"] == "engine-test"


def failing_train(job):
    """Runs on every rank: the error each rank raises, as text."""
    try:
        train_offline(job)
    except Exception as error:  # noqa: BLE001 - the test compares the messages
        return f"{type(error).__name__}: {error}"
    return "trained"


def test_a_wandb_dir_rank_0_cannot_create_stops_every_rank(pool, corpus, tmp_path):  # noqa: F811
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    # A short timeout: a rank left waiting for rank 0 would fail, but differently.
    training = {"train_iters": ITERS, "wandb_project": "engine-test",
                "wandb_save_dir": str(blocked / "wandb"),
                "distributed_timeout_minutes": 0.5}  # fmt: skip
    first, second = pool.run(failing_train, make_job(corpus, 1, 2, training=training))
    assert str(blocked / "wandb") in first, first
    assert second == (
        "RuntimeError: rank 0 could not open --tensorboard-dir / --wandb-project logging "
        "(see its error)"
    )


def test_wandb_flags_land_on_their_fields_and_need_the_project(capsys):
    job = parse_args("--model-preset tiny --train-iters 2 --wandb-project p --wandb-exp-name e "
                     "--wandb-save-dir w --save ck".split(), world_size=1)  # fmt: skip
    t = job.training
    assert (t.wandb_project, t.wandb_exp_name, t.wandb_save_dir) == ("p", "e", "w")
    assert wandb_dir(t.wandb_save_dir, job.checkpoint.save) == "w"
    assert wandb_dir(None, "ck") == os.path.join("ck", "wandb")  # Megatron's default
    assert wandb_dir(None, None) is None  # W&B's own: the working directory
    with pytest.raises(SystemExit):
        parse_args("--model-preset tiny --train-iters 2 --wandb-exp-name e".split(), world_size=1)
    assert "--wandb-exp-name (e) needs --wandb-project" in capsys.readouterr().err
    # An empty project is no W&B, as in Megatron (a script's unset variable).
    empty = parse_args("--model-preset tiny --wandb-project= --wandb-exp-name=".split())
    assert empty.training.wandb_errors() == []


def test_wandb_project_without_the_package_is_a_usage_error_before_starting():
    # sys.modules["wandb"] = None makes `import wandb` raise ImportError, as when not installed.
    prelude = (
        "import runpy, sys; sys.modules['wandb'] = None; "
        "sys.argv = ['examples/pretrain.py'] + sys.argv[1:]; "
        "runpy.run_path('examples/pretrain.py', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude, "--model-preset", "tiny", "--train-iters", "10",
         "--wandb-project", "demo"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "--wandb-project demo: needs the wandb package" in line
    assert "pip install -e '.[wandb]'" in line
    assert "iteration" not in result.stdout
