"""benchmarks/gpu_check.sh, run as a user runs it, on this CPU machine.

Without a GPU it says so and exits 0; with ``GPU_CHECK_ON_CPU=1`` every section runs on the CPU
at tiny sizes (the helpers built, two kernel tests and the throughput benchmark under Triton's
interpreter, a 2-layer model trained eager and compiled), so each summary line the script
writes on a GPU is produced here by the same code. A section past its time limit is reported
as failed and the script goes on.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.paths import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
NUMBER = r"\d+(?:\.\d+)?(?:e[-+]\d+)?"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machines without one")


def run_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    clean.pop("TRITON_INTERPRET", None)  # the script chooses per section
    return subprocess.run(["bash", str(SCRIPT), str(out)], env={**clean, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def summary(out: Path) -> dict[str, str]:
    """The summary file's lines by their first word (each section writes one)."""
    lines = out.read_text().splitlines()
    by_name = {line.split(" ", 1)[0]: line for line in lines}
    assert len(by_name) == len(lines), lines  # no section wrote two lines
    return by_name


def figure(line: str, key: str) -> float:
    match = re.search(rf"\b{key}=({NUMBER})", line)
    assert match, f"{key}= not in {line!r}"
    return float(match[1])


def test_usage_error_without_the_summary_file():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage: bash benchmarks/gpu_check.sh OUTFILE" in result.stderr


@no_gpu
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "summary.txt"
    result = run_check(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA GPU on this machine" in result.stdout
    assert out.read_text() == "gpu_check skipped: no CUDA GPU\n"


@no_gpu
def test_every_section_runs_on_the_cpu(tmp_path):
    out, work = tmp_path / "summary.txt", tmp_path / "work"
    result = run_check(out, GPU_CHECK_ON_CPU="1", GPU_CHECK_DIR=str(work))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = summary(out)
    assert list(lines) == [
        "device", "install", "kernel_tests", "flash_attention", "rmsnorm", "train_eager",
        "train_compiled", "gpu_check",
    ]  # fmt: skip
    assert re.fullmatch(r"device name=cpu torch=\S+ cuda=None triton=\S+", lines["device"])
    assert re.fullmatch(r"install method=build-only seconds=\d+", lines["install"])
    # The helpers were built into the scratch directory, not over the installed ones.
    assert list(work.glob("helpers*.so")), sorted(p.name for p in work.iterdir())
    assert re.fullmatch(
        rf"kernel_tests device=cpu passed=2 failed=0 skipped=0 errors=0 seconds={NUMBER}",
        lines["kernel_tests"],
    )
    attention = lines["flash_attention"]
    assert attention.startswith("flash_attention dtype=float16 fwd_tflops="), attention
    for key in ("fwd_tflops", "bwd_tflops", "sdpa_flash_fwd_tflops", "ratio_vs_sdpa_flash"):
        assert figure(attention, key) > 0
    norm = lines["rmsnorm"]
    for key in ("fwd_gbps", "bwd_gbps", "copy_gbps", "fraction_of_bandwidth", "ratio_vs_torch"):
        assert figure(norm, key) > 0
    # The table behind the summary: ours and SDPA's flash backend on the same shape.
    table = (work / "kernels" / "kernels.csv").read_text()
    assert ",triton,True,32," in table and ",sdpa_flash,True,32," in table
    eager, compiled = lines["train_eager"], lines["train_compiled"]
    for line in (eager, compiled):
        assert figure(line, "tokens_per_s") > 0 and figure(line, "step_ms") > 0
        assert " mfu=n/a " in line and figure(line, "peak_rss_gb") > 0  # no MFU peak on a CPU
        assert figure(line, "plan_peak_mem_gb") > 0 and "iterations=3 timed=2" in line
    assert figure(compiled, "compile_s") > 0 and "compile_s=" not in eager
    # Same seed, same data: the Triton-interpreted eager model and the compiled PyTorch-backend
    # model start from the same loss.
    assert figure(eager, "loss_first") == pytest.approx(figure(compiled, "loss_first"), abs=1e-3)
    assert re.fullmatch(rf"gpu_check failed=0 seconds={NUMBER}", lines["gpu_check"])


@no_gpu
def test_a_failing_section_is_reported_and_the_rest_still_run(tmp_path):
    # A one-second limit stops every timed section: each says so, and the script goes on to
    # the next one, then exits 1.
    out = tmp_path / "summary.txt"
    limits = {
        f"GPU_CHECK_LIMIT_{name}": "1"
        for name in ("INSTALL", "KERNEL_TESTS", "THROUGHPUT", "TRAIN_EAGER", "TRAIN_COMPILED")
    }
    result = run_check(out, GPU_CHECK_ON_CPU="1", GPU_CHECK_DIR=str(tmp_path / "work"), **limits)
    assert result.returncode == 1, result.stdout[-3000:]
    failed = [line for line in out.read_text().splitlines() if line.startswith("FAIL ")]
    names = [line.split()[1].rstrip(":") for line in failed]
    assert names == ["install", "kernel_tests", "throughput", "train_eager", "train_compiled"]
    assert all("stopped after 1 s (GPU_CHECK_LIMIT_" in line for line in failed), failed
    assert out.read_text().splitlines()[-1].startswith("gpu_check failed=5 seconds=")
