"""The benchmark scripts run as users run them (`python benchmarks/X.py`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"engine", "kernels", "tests", "tools"}


def benchmark_lines(script: str, *args: str) -> list[str]:
    """Run ``benchmarks/{script}`` as a user would; its stdout lines (it must exit 0)."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()


def test_no_script_shadows_a_package():
    # A script's directory comes first on sys.path: benchmarks/kernels.py once made
    # `import kernels` find itself, breaking every benchmark that imports the model.
    for folder in ("benchmarks", "examples", "tools"):
        shadowing = {p.stem for p in (REPO / folder).glob("*.py")} & PACKAGES - {folder}
        assert not shadowing, f"{folder}/ has scripts named like packages: {shadowing}"


def test_model_cpu_benchmark_prints_its_ratios_for_both_shapes_and_modes():
    # The size flags shrink both preset shapes; eager and compiled (torch.compile per layer).
    lines = benchmark_lines(
        "model_cpu.py", "--layers", "1",
        "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "500", "--seq", "32",
        "--batch", "2", "--repeats", "1", "--shape", "both", "--mode", "both"
    )  # fmt: skip
    results = [line for line in lines if line.startswith("shape=")]
    number = r"(\d+\.\d+)"
    pattern = (
        rf"shape=(\w+) mode=(\w+) tokens_per_s=\d+ hf_tokens_per_s=\d+ gflops={number} "
        rf"hf_gflops={number} gemm_ceiling_gflops={number} ratio_vs_hf={number} "
        rf"fraction_of_gemm_ceiling={number}"
    )
    matches = [re.fullmatch(pattern, line) for line in results]
    assert all(matches), results
    runs = [(m[1], m[2]) for m in matches if m]
    assert runs == [(s, m) for s in ("default", "compute") for m in ("eager", "compiled")]
    for m in matches:
        assert m is not None
        gflops, ceiling, fraction = float(m[3]), float(m[5]), float(m[7])
        assert ceiling > 0 and gflops > 0, m[0]
        # The fraction is the achieved GFLOP/s over the ceiling measured in the same run.
        assert abs(fraction - gflops / ceiling) < 0.006, m[0]


def test_checkpoint_io_benchmark_prints_its_ratios(tmp_path):
    lines = benchmark_lines(
        "checkpoint_io.py", "--size-mb", "3",
        "--rounds", "1", "--dir", str(tmp_path)
    )  # fmt: skip
    assert lines[0].startswith("hash GB/s (one core): xxh3_64 "), lines[0]
    assert re.fullmatch(r"async_stall_over_sync_stall=\d+\.\d{3}", lines[-6]), lines[-6]
    assert re.fullmatch(r"verify_overhead_pct=-?\d+\.\d", lines[-1]), lines[-1]


def test_context_parallel_benchmark_prints_its_ratios():
    lines = benchmark_lines(
        "context_parallel.py", "--seq", "64",
        "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--repeats", "1",
        "--cp-sizes", "2,4"
    )  # fmt: skip
    balance = [line for line in lines if line.startswith("cp=")]
    assert len(balance) == 2, lines
    for line, cp in zip(balance, (2, 4), strict=True):
        # The load-balanced split gives every rank the same causal work, exactly.
        match = re.fullmatch(
            rf"cp={cp} balanced_max_over_min=1\.000 contiguous_max_over_min=(\d+\.\d{{3}})", line
        )
        assert match and float(match[1]) > 1, line
    assert re.fullmatch(r"ring_s=\d+\.\d{4}", lines[-3]), lines[-3]
    assert re.fullmatch(r"compute_only_s=\d+\.\d{4}", lines[-2]), lines[-2]
    assert re.fullmatch(r"exposed_comm_pct=-?\d+\.\d", lines[-1]), lines[-1]


def test_memory_benchmark_prints_its_ratios():
    lines = benchmark_lines(
        "memory.py", "--vocab", "5000",
        "--hidden", "64", "--tokens", "256", "--chunk", "64", "--repeats", "1",
        "--dp-world", "2", "--dp-hidden", "64", "--dp-layers", "1"
    )  # fmt: skip
    # Counted, not timed: FSDP2 at DP=2 holds half of DDP's weights, gradients and state.
    fsdp = float(lines[-6].removeprefix("fsdp2_over_ddp_state="))
    assert lines[-6].startswith("fsdp2_over_ddp_state=") and 0.45 < fsdp < 0.55, lines[-6]
    assert re.fullmatch(r"zero1_over_ddp_state=\d\.\d{3}", lines[-7]), lines[-7]
    assert re.fullmatch(r"saved_whole_over_chunked=\d+\.\d\d", lines[-4]), lines[-4]
    assert re.fullmatch(r"peak_whole_over_chunked=\d+\.\d\d", lines[-3]), lines[-3]
    assert re.fullmatch(r"time_chunked_over_whole=\d+\.\d{3}", lines[-2]), lines[-2]
    assert re.fullmatch(r"time_recomputing_over_whole=\d+\.\d{3}", lines[-1]), lines[-1]


def test_dedup_benchmark_prints_its_ratios():
    lines = benchmark_lines(
        "dedup.py", "--documents", "300",
        "--repeats", "1"
    )  # fmt: skip
    sides = ["ours", "ours_agreement", "datatrove"]
    names = [f"{side}_{kind}" for kind in ("recall", "precision") for side in sides]
    for line, name in zip(lines[-8:-2], names, strict=True):
        assert re.fullmatch(rf"{name}=[01]\.\d{{3}}", line), line
    for line, side in zip(lines[-2:], sides, strict=False):
        assert re.fullmatch(rf"{side}_over_datatrove_docs_per_s=\d+\.\d{{3}}", line), line
    # Counted, not timed: every side removes every exact duplicate (equal shingle sets give
    # equal signatures), and none a base document at this size.
    exact = next(line for line in lines if line.startswith("  J = 1: "))
    pairs, *removed = map(int, exact.removeprefix("  J = 1: ").split(", "))
    assert pairs > 0 and removed == [pairs] * 3, exact
    for side in sides:
        assert f"{side}_removed_background=0" in lines, lines


def test_init_benchmark_prints_one_rank_per_tp_size(tmp_path):
    lines = benchmark_lines(
        "init.py", "--layers", "1", "--hidden", "64", "--heads", "4", "--ffn", "176",
        "--vocab", "512", "--tp", "1,2", "--rounds", "1", "--load-dir", str(tmp_path)
    )  # fmt: skip
    number = r"(\d+\.\d+)"
    sides = rf"layout_free_s={number} meta_s={number} plain_s={number}"
    load = rf" initialised_then_load_s={number} meta_then_load_s={number}"
    tp1 = re.fullmatch(rf"tp=1 local_params=(\d+) {sides}{load} ratio_vs_plain={number}",
                       lines[-2])  # fmt: skip
    tp2 = re.fullmatch(rf"tp=2 local_params=(\d+) {sides} ratio_vs_plain={number}", lines[-1])
    assert tp1 and tp2, lines
    # Counted, not timed: a rank at TP=2 holds fewer parameters than at TP=1.
    assert int(tp2[1]) < int(tp1[1])
    assert list(tmp_path.iterdir()) == []  # the load path's checkpoint is removed


def test_kernel_throughput_refuses_bad_flags_up_front():
    # Its sections run in tests/test_gpu_check.py (--cpu, through benchmarks/gpu_check.sh).
    for args, message in [
        (["--kv-heads", "3"], "--kv-heads must divide the 16 query heads, got 3"),
        (["--cpu", "--dtype", "bfloat16"], "Triton's interpreter cannot compute in bfloat16"),
    ]:
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_throughput.py"),
                                 *args], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
