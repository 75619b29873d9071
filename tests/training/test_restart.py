"""A restart that resumes: ``torchrun --max-restarts 1 examples/pretrain.py ... --save D --load D``
with one worker SIGKILLed once a checkpoint exists. torchrun starts a new worker group, which
rendezvouses again (through torchrun's store, kept across attempts: `engine.device` keeps each
attempt's keys apart), loads the latest complete checkpoint and continues: the run exits 0 and
every iteration after the checkpoint has the loss of an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.examples.test_launchers import PRETRAIN, TINY, losses, recipe_env, tokenizer  # noqa: F401
from tests.paths import REPO
from tests.training.test_training import corpus  # noqa: F401 (a fixture)

ITERS = 30  # long enough that the kill lands while the workers still train


def torchrun(corpus: str, save: Path, max_restarts: int) -> subprocess.Popen:  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(max_restarts), str(REPO / "examples" / "pretrain.py"),
        "--model-preset", "tiny", "--vocab-size", "256", "--tensor-model-parallel-size", "2",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
        "--train-iters", str(ITERS), "--eval-iters", "0", "--log-interval", "1", "--lr", "1e-3",
        "--data-path", corpus, "--split", "90,5,5", "--num-workers", "0",
        "--save", str(save), "--load", str(save), "--save-interval", "2",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=save.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def workers(agent: subprocess.Popen | int) -> list[int]:
    """A process's children (a torchrun agent's: its worker processes)."""
    pid = agent if isinstance(agent, int) else agent.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(pid) for pid in children.split()]


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return stdout, stderr


def test_a_killed_worker_restarts_from_the_latest_checkpoint(corpus, tmp_path):  # noqa: F811
    reference = losses(finish(torchrun(corpus, tmp_path / "reference", max_restarts=0))[0])
    assert sorted(reference) == list(range(1, ITERS + 1))

    save = tmp_path / "restarted"
    agent = torchrun(corpus, save, max_restarts=1)
    deadline = time.monotonic() + 240
    while not (save / "iter_0000002").is_dir() and agent.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint at iteration 2"
        time.sleep(0.02)
    killed = workers(agent)[-1]
    os.kill(killed, signal.SIGKILL)
    stdout, stderr = finish(agent)

    loaded = re.findall(rf"loaded {re.escape(str(save))} at iteration (\d+)", stdout + stderr)
    assert len(loaded) == 1, stdout[-3000:] + stderr[-3000:]  # the restarted attempt loaded
    resumed_at = int(loaded[0])
    assert 2 <= resumed_at < ITERS, f"killed pid {killed} after the run: {stdout[-2000:]}"
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {killed})" in stderr
    assert stdout.count("training from scratch") + stderr.count("training from scratch") == 1
    after = stdout[stdout.index(f"training {ITERS} iterations from iteration {resumed_at}") :]
    resumed = losses(after)
    assert sorted(resumed) == list(range(resumed_at + 1, ITERS + 1))  # nothing retrained from 0
    assert resumed == {i: reference[i] for i in resumed}


def test_the_launchers_restart_a_two_node_job_from_its_checkpoint(corpus, tokenizer, tmp_path):  # noqa: F811
    """``bash examples/pretrain_7b.sh`` as two one-process "nodes" (c10d rendezvous, a fresh
    store each round, MAX_RESTARTS=1, --load = --save): a worker of node 1 SIGKILLed after a
    checkpoint; both agents re-rendezvous, the group loads it and trains to the end."""
    from tests.training.test_multinode import free_port

    port, iters = free_port(), 20
    env = recipe_env(tmp_path / "home", NNODES=2, GPUS_PER_NODE=1, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port, RDZV_ID="restart", MAX_RESTARTS=1, TP=1, PP=1,
                     MICRO_BATCH_SIZE=2, GLOBAL_BATCH_SIZE=4, OUTPUT_DIR=tmp_path / "out",
                     DATA_PATH=corpus, TOKENIZER_MODEL=tokenizer)  # fmt: skip
    flags = [*TINY, "--train-iters", str(iters), "--save-interval", "2"]
    nodes = [
        subprocess.Popen(
            ["bash", str(PRETRAIN), *flags],
            cwd=tmp_path,
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    save = tmp_path / "out" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (save / "iter_0000002").is_dir() and nodes[1].poll() is None:
        assert time.monotonic() < deadline, "no checkpoint at iteration 2"
        time.sleep(0.02)
    (agent,) = workers(nodes[1])  # bash -> torchrun's agent -> its worker
    os.kill(workers(agent)[-1], signal.SIGKILL)
    stdout = "".join(finish(node)[0] for node in nodes)
    (resumed_at,) = map(int, re.findall(rf"loaded {re.escape(str(save))} at iteration (\d+)",
                                        stdout))  # fmt: skip
    assert 2 <= resumed_at < iters, stdout[-3000:]
    after = stdout[stdout.index(f"training {iters} iterations from iteration {resumed_at}") :]
    assert sorted(losses(after)) == list(range(resumed_at + 1, iters + 1))
