"""Pre-emption that saves, with the DataLoader's worker processes on (``--num-workers 2``, the
default): SIGTERM delivered to torchrun, to every process of the job (as SLURM does) or to one
rank makes every rank save at the next iteration boundary and exit 0. A torchrun agent killed
with SIGKILL takes its ranks and their workers with it (no orphans).

Real torchrun, real signals, 2 ranks (DP=2), the tiny LLaMA on the byte-token corpus.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.paths import REPO
from tests.training.test_training import corpus  # noqa: F401 (a fixture)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (ranks and their DataLoader workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def start_training(corpus: str, save: Path, *flags: str) -> subprocess.Popen:  # noqa: F811
    """torchrun of examples/pretrain.py on 2 ranks, long enough to be interrupted, saving only
    when told to stop (``flags`` come last: they override); stdout and stderr are read line by
    line, together."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(REPO / "examples" / "pretrain.py"), "--model-preset", "tiny", "--vocab-size", "256",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
        "--train-iters", "100000", "--eval-iters", "0", "--log-interval", "1", "--lr", "1e-3",
        "--data-path", corpus, "--split", "90,5,5", "--num-workers", "2", "--save", str(save),
        *flags,
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_for_line(process: subprocess.Popen, pattern: str, timeout_s: float = 120) -> list[str]:
    """stdout lines up to the first matching ``pattern``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    process.kill()
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(lines[-60:]))


def ranks_and_workers(torchrun: int) -> tuple[list[int], list[int]]:
    """The rank processes (torchrun's children) and the processes below them (workers)."""
    ranks = [p for p in descendants(torchrun) if p in children_of(torchrun)]
    workers = [p for rank in ranks for p in descendants(rank)]
    return ranks, workers


def children_of(pid: int) -> set[int]:
    return {p for p in descendants(pid) if _parent(p) == pid}


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


@pytest.mark.parametrize("target", ["torchrun", "every process", "one rank"])
def test_sigterm_saves_at_the_next_iteration_with_dataloader_workers(
    corpus,  # noqa: F811
    tmp_path,
    target,
):
    save = tmp_path / "ckpt"
    process = start_training(corpus, save)
    try:
        wait_for_line(process, r"^iteration 3/")
        ranks, workers = ranks_and_workers(process.pid)
        assert len(ranks) == 2 and len(workers) >= 4, (ranks, workers)  # 2 workers a rank
        targets = {
            "torchrun": [process.pid],
            "every process": [process.pid, *ranks, *workers],
            "one rank": ranks[1:],
        }[target]
        for pid in targets:
            os.kill(pid, signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stopped = re.search(r"exiting at iteration (\d+): SIGTERM received", out)
    assert stopped, out[-4000:]
    assert "killed by signal" not in out, out[-4000:]
    iteration = int(stopped.group(1))
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iteration)
    assert (save / f"iter_{iteration:07d}" / "metadata.json").is_file()
    assert re.search(rf"done: iteration {iteration} .*stopped: SIGTERM received", out), out[-3000:]
    assert "exitcode" not in out, out[-4000:]  # torchrun's report of a rank that failed
    if target == "one rank":
        assert process.returncode == 0, out[-4000:]
    # A signalled torchrun agent stops its ranks with SIGTERM (which they take as the notice
    # above), waits for them, then raises its SignalException: its own status is 1 whatever
    # the ranks did. The ranks saved and returned 0 (the 'done' line, no failure report).


def test_sigkill_of_torchrun_leaves_no_rank_or_worker_alive(corpus, tmp_path):  # noqa: F811
    process = start_training(corpus, tmp_path / "ckpt")
    try:
        wait_for_line(process, r"^iteration 2/")
        ranks, workers = ranks_and_workers(process.pid)
        assert len(ranks) == 2 and workers, (ranks, workers)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in ranks + workers):
            time.sleep(0.5)
        left = [p for p in ranks + workers if alive(p)]
        assert not left, f"still running 30 s after torchrun was killed: {left}"
    finally:
        for pid in descendants(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
