"""Multi-node training on one machine: ``bash examples/pretrain_7b.sh`` started twice, as node 0
and node 1 of ``NNODES=2`` with 4 processes each (two torchrun agents meeting at a c10d
rendezvous on 127.0.0.1), trains TP=2 x PP=2 x DP=2 with exactly the per-iteration losses of
the same recipe on one node of 8 processes. Rank placement across agents is the rendezvous'
business; the job must not depend on it."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from tests.examples.test_launchers import PRETRAIN, TINY, losses, recipe_env, tokenizer  # noqa: F401
from tests.training.test_training import corpus  # noqa: F401 (a fixture)

LAYOUT = {"TP": 2, "PP": 2, "MICRO_BATCH_SIZE": 2, "GLOBAL_BATCH_SIZE": 8}
"""The recipe's own layout settings (its env), for 8 processes: DP=2, 2 microbatches each."""
FLAGS = [*TINY, "--global-batch-size", "8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(tmp_path: Path, name: str, nodes: int, node_rank: int, gpus: int, port: int,
               corpus: str, tokenizer: str) -> subprocess.Popen:  # noqa: F811  # fmt: skip
    env = recipe_env(tmp_path / "home", NNODES=nodes, NODE_RANK=node_rank, GPUS_PER_NODE=gpus,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID=name, MAX_RESTARTS=0,
                     OUTPUT_DIR=tmp_path / name, DATA_PATH=corpus, TOKENIZER_MODEL=tokenizer,
                     **LAYOUT)  # fmt: skip
    return subprocess.Popen(["bash", str(PRETRAIN), *FLAGS], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(*processes: subprocess.Popen) -> list[str]:
    """Every agent's stdout, once all have exited; a failure shows each agent's tail (the one
    that fails first is not always the one that reports)."""
    results = []
    try:
        for process in processes:
            results.append((process, *process.communicate(timeout=300)))
    finally:
        for process in processes:
            process.kill()
    report = "".join(
        f"\n--- agent {i}: exit {p.returncode}\n{out[-3000:]}{err[-4000:]}"
        for i, (p, out, err) in enumerate(results)
    )
    assert all(p.returncode == 0 for p, _, _ in results), report
    return [out for _, out, _ in results]


def test_two_nodes_of_four_train_as_one_node_of_eight(corpus, tokenizer, tmp_path):  # noqa: F811
    port = free_port()
    nodes = [start_node(tmp_path, "two", 2, rank, 4, port, corpus, tokenizer) for rank in (0, 1)]
    outputs = finish(*nodes)
    assert "node 0 of 2: 4 processes" in outputs[0] and "node 1 of 2: 4 processes" in outputs[1]
    two = losses("".join(outputs))  # global rank 0 logs, on whichever agent holds it
    one = losses(*finish(start_node(tmp_path, "one", 1, 0, 8, free_port(), corpus, tokenizer)))
    assert sorted(two) == sorted(one) == [1, 2, 3]
    assert two == one, f"two nodes: {two}, one node: {one}"
    metadata = tmp_path / "two" / "checkpoints" / "iter_0000003" / "metadata.json"
    parallel = json.loads(metadata.read_text())["config"]["parallel"]
    assert (parallel["tensor_model_parallel_size"], parallel["pipeline_model_parallel_size"]) == (
        2, 2
    )  # fmt: skip
