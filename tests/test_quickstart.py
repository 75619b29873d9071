"""The quickstart as users run it (`examples/quickstart.sh`, behind `make quickstart`), shortened
to 30 iterations: corpus and tokenizer from pydoc_data, preprocessing, 8 gloo processes under
torchrun at TP=2 x PP=2 x DP=2, a stop with a checkpoint at 20, a resume to 30, the PNG of both
launches' scalars (`tools/plot_run.py`); and the entry point's checks that run before any process
group starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tools.plot_run import plot_run

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^iteration (\d+)/(\d+) \| loss (\d\.\d{6}E[+-]\d\d) \| lr \S+ \| grad norm \S+ \| "
    r"tokens/s \d+ \| "
)


def logged(path: Path) -> dict[int, float]:
    matches = [LINE.match(line) for line in path.read_text().splitlines()]
    return {int(m.group(1)): float(m.group(3)) for m in matches if m}


def test_quickstart_trains_stops_resumes_and_reports(tmp_path):
    out = tmp_path / "quickstart"
    env = {**os.environ, "QUICKSTART_DIR": str(out), "QUICKSTART_ITERS": "30",
           "QUICKSTART_STOP": "20", "PYTHON": sys.executable}  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "quickstart.sh"), "--log-interval", "5",
         "--eval-interval", "10", "--lr-warmup-iters", "2"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = logged(out / "train.log"), logged(out / "resume.log")
    assert sorted(first) == [5, 10, 15, 20], result.stdout
    assert sorted(second) == [25, 30], result.stdout
    assert second[30] < first[5] - 1.0, f"the loss did not fall: {first} {second}"
    assert "exiting at iteration 20: --exit-interval (20) reached" in result.stdout
    assert "loaded" in result.stdout and "from iteration 20" in result.stdout
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "30"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = result.stdout[result.stdout.index("== quickstart done") :]
    assert f"checkpoints:   {out}/checkpoints (latest: iteration 30)" in summary
    assert f"tensorboard --logdir {out}/tensorboard" in summary
    assert f"plot:          {out}/run.png" in summary
    assert (out / "run.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The same figure again, to look at: every panel, the loss over both launches.
    figure = plot_run(out / "tensorboard", tmp_path / "again.png")
    assert [axes.get_title() for axes in figure.axes] == [
        "loss", "learning rate", "grad norm", "throughput", "memory",
    ]  # fmt: skip
    train = next(line for line in figure.axes[0].lines if line.get_label() == "train")
    assert list(train.get_xdata()) == [5, 10, 15, 20, 25, 30]
    validation = next(line for line in figure.axes[0].lines if line.get_label() == "validation")
    assert list(validation.get_xdata()) == [10, 20, 30]


def test_entry_point_rejects_a_bad_layout_before_starting():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "pretrain.py"), "--model-preset", "tiny",
         "--tensor-model-parallel-size=3", "--train-iters", "10"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--num-attention-heads (4) must be divisible by --tensor-model-parallel-size (3)" in (
        result.stderr
    )


def test_dry_run_prints_the_plan_without_training():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "pretrain.py"), "--model-preset", "llama2-7b",
         "--tensor-model-parallel-size", "8", "--bf16", "--use-distributed-optimizer",
         "--micro-batch-size", "1", "--global-batch-size", "32", "--train-iters", "10",
         "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "WORLD_SIZE": "32"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "layout: world 32 = TP 8 x PP 1 x DP 4" in result.stdout
