"""The quickstart's training entry point, launched as users launch it: torchrun, 2 gloo ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^iteration (\d+)/(\d+) \| loss (\d\.\d{6}E[+-]\d\d) \| lr \S+ \| grad norm \S+ \| "
    r"tokens/s \d+$"
)


def test_pretrain_example_learns_under_tensor_parallelism():
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(REPO / "examples" / "pretrain.py"), "--tensor-model-parallel-size", "2",
            "--sequence-parallel", "--train-iters", "20", "--log-interval", "5",
        ],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    matches = [LINE.match(line) for line in result.stdout.splitlines()]
    losses = [float(m.group(3)) for m in matches if m]
    assert [int(m.group(1)) for m in matches if m] == [5, 10, 15, 20], result.stdout
    assert losses[-1] < losses[0] - 1.0, f"the loss did not fall: {losses}"


def test_pretrain_example_rejects_a_bad_layout_before_starting():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "pretrain.py"), "--tensor-model-parallel-size=3"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--num-attention-heads (4) must be divisible by --tensor-model-parallel-size (3)" in (
        result.stderr
    )
