"""The 7B recipes as users type them, from a directory outside the checkout.

- ``torchrun [its options] examples/pretrain_7b.sh [flags]``: the file is bash and Python at
  once; under torchrun it trains with the recipe's flags (TP from torchrun's
  ``LOCAL_WORLD_SIZE``, bf16, --load = --save) and the tiny-model flags given after it, reading
  paths relative to the caller's directory and writing under ``$HOME``, not the checkout;
- ``DRY_RUN=1`` names a missing ``.bin`` / ``.idx`` of any prefix of a blend, a missing
  tokenizer model or SFT file, and exits non-zero; with everything there it plans and exits 0;
- ``finetune_lora_7b.sh`` plans TP 2 x PP 1 x DP with rank-16 adapters on every projection,
  names a missing ``--pretrained-checkpoint``, and under torchrun trains adapters on a tiny
  base, then resumes them with the same command;
- node counts whose DP does not divide the global batch fail before torchrun starts, naming the
  batch sizes and node counts that work;
- the SLURM script writes its log into the submit directory, which exists when SLURM opens it.

``bash examples/pretrain_7b.sh`` starting torchrun on one and on two "nodes" is
tests/training/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import re
import subprocess
import sys

import pytest

from tests.paths import REPO
from tests.training.test_training import corpus  # noqa: F401 (a fixture)

PRETRAIN, FINETUNE = REPO / "examples" / "pretrain_7b.sh", REPO / "examples" / "finetune_7b.sh"
LORA = REPO / "examples" / "finetune_lora_7b.sh"
LINE = re.compile(r"^iteration (\d+)/(\d+) \| loss (\S+) \|", re.MULTILINE)
TINY = [
    "--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "3", "--log-interval", "1",
    "--eval-iters", "0", "--num-workers", "0", "--lr-warmup-iters", "1",
]  # fmt: skip
"""Flags after the recipe that shrink LLaMA-2-7B to the tiny model (the last flag wins)."""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A 300-piece SentencePiece model (the recipes' Llama2Tokenizer type reads it): more ids
    than the byte corpus uses, trained in a fraction of a second."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("tokenizer")
    text = directory / "text.txt"
    text.write_text("\n".join(list(pydoc_data.topics.topics.values())[:40]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "tok"), vocab_size=300,
        model_type="bpe", minloglevel=2,
    )  # fmt: skip
    return str(directory / "tok.model")


def recipe_env(home, **settings) -> dict[str, str]:
    """The caller's environment for a recipe: ``HOME`` (where outputs go by default), no
    SLURM or placement variables of the machine running the tests, one thread a rank."""
    placement = ("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "OUTPUT_DIR", "GPUS_PER_NODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(placement)}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHON=sys.executable, HOME=str(home))
    env.update({key: str(value) for key, value in settings.items()})
    return env


def losses(stdout: str) -> dict[int, float]:
    """Iteration -> loss, from rank 0's log lines."""
    return {int(m.group(1)): float(m.group(3)) for m in LINE.finditer(stdout)}


def test_torchrun_runs_the_recipe_file_with_paths_of_the_caller(corpus, tokenizer, tmp_path):  # noqa: F811
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = recipe_env(home, DATA_PATH=os.path.relpath(corpus, work),
                     TOKENIZER_MODEL=os.path.relpath(tokenizer, work))  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(PRETRAIN), *TINY]  # fmt: skip
    run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert sorted(losses(run.stdout)) == [1, 2, 3], run.stdout
    checkpoints = home / "engine-runs" / "llama2-7b" / "checkpoints"
    assert f"outputs: checkpoints in {checkpoints}" in run.stderr
    # --load = --save: the first start finds nothing yet and trains from scratch
    assert f"no checkpoint in --load {checkpoints} yet" in run.stdout + run.stderr
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert list((home / "engine-runs" / "llama2-7b" / "tensorboard").glob("events.out.*"))
    assert not (REPO / "checkpoints").exists() and not (work / "checkpoints").exists()
    # The recipe's own flags were in effect: TP from torchrun's LOCAL_WORLD_SIZE, bf16.
    config = json.loads((checkpoints / "iter_0000003" / "metadata.json").read_text())["config"]
    assert config["parallel"]["tensor_model_parallel_size"] == 2
    assert config["optimizer"]["bf16"] and config["model"]["recompute_granularity"] == "selective"


def dry_run(recipe, cwd, **settings) -> subprocess.CompletedProcess:
    env = recipe_env(cwd / "home", DRY_RUN=1, **settings)
    return subprocess.run(["bash", str(recipe)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_dry_run_names_each_missing_input(corpus, tokenizer, tmp_path):  # noqa: F811
    (tmp_path / "half.bin").write_bytes(b"")  # a prefix whose .idx is missing
    blend = f"0.7 {corpus} 0.3 {tmp_path / 'half'}"
    missing = dry_run(
        PRETRAIN, tmp_path, NNODES=4, DATA_PATH=blend, TOKENIZER_MODEL="nowhere.model"
    )
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "layout: world 32 = TP 8 x PP 2 x DP 2" in missing.stdout  # the plan comes first
    assert f"--data-path: {tmp_path / 'half'}.idx not found" in missing.stderr
    assert corpus + ".bin" not in missing.stderr  # the prefix that exists is not named
    assert "--tokenizer-model: nowhere.model not found" in missing.stderr

    ok = dry_run(PRETRAIN, tmp_path, NNODES=4, DATA_PATH=f"0.5 {corpus} 0.5 {corpus}",
                 TOKENIZER_MODEL=tokenizer)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "recompute selective, sequence parallel on" in ok.stdout

    sft = dry_run(FINETUNE, tmp_path, SLURM_JOB_NUM_NODES=2, SLURM_NODEID=1,
                  SFT_DATA="chats.jsonl", TOKENIZER_MODEL=tokenizer)  # fmt: skip
    assert sft.returncode == 1 and "node 1 of 2" in sft.stdout, sft.stdout + sft.stderr
    assert "layout: world 16 = TP 8 x PP 2 x DP 1" in sft.stdout
    assert "--data-path: chats.jsonl does not exist" in sft.stderr


@pytest.mark.parametrize("nodes, dp, pp", [(3, 3, 1), (5, 5, 1), (6, 3, 2), (7, 7, 1)])
def test_a_node_count_whose_dp_does_not_divide_the_batch_fails_before_torchrun(
    nodes, dp, pp, tmp_path
):
    env = recipe_env(tmp_path, NNODES=nodes)
    run = subprocess.run(["bash", str(PRETRAIN)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1
    assert (
        f"GLOBAL_BATCH_SIZE (1024) is not a multiple of MICRO_BATCH_SIZE x DP = 1 x {dp} "
        f"(NNODES={nodes} x GPUS_PER_NODE=8 / (TP=8 x PP={pp})); set GLOBAL_BATCH_SIZE="
    ) in run.stderr
    assert "NNODES in {1 2 4 8" in run.stderr
    assert "rendezvous" not in run.stdout  # torchrun never started


def test_a_batch_that_fits_the_odd_layout_plans(corpus, tokenizer, tmp_path):  # noqa: F811
    run = dry_run(PRETRAIN, tmp_path, NNODES=3, GLOBAL_BATCH_SIZE=1026, DATA_PATH=corpus,
                  TOKENIZER_MODEL=tokenizer)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "layout: world 24 = TP 8 x PP 1 x DP 3" in run.stdout


def test_the_slurm_log_goes_where_slurm_can_open_it():
    """SLURM opens ``--output`` before the script runs, relative to the submit directory: a
    file name without a directory always opens. Under sbatch the script is a spool copy, so
    it finds the recipe from the submit directory (or ENGINE_DIR), never from ``$0``."""
    text = (REPO / "examples" / "slurm_pretrain_7b.sbatch").read_text()
    outputs = re.findall(r"^#SBATCH --output=(\S+)", text, re.MULTILINE)
    assert outputs and all("/" not in output for output in outputs), outputs
    assert "$0" not in text.split("\n#SBATCH --output", 1)[1]
    check = subprocess.run(["bash", "-n", str(REPO / "examples" / "slurm_pretrain_7b.sbatch")])
    assert check.returncode == 0


def test_lora_dry_run_plans_the_adapters_and_names_a_missing_base(tokenizer, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": "2 + 2?", "response": "4"}) + "\n")
    run = dry_run(LORA, tmp_path, SFT_DATA=chats, TOKENIZER_MODEL=tokenizer)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "layout: world 8 = TP 2 x PP 1 x DP 4" in run.stdout
    assert "sequence parallel on" in run.stdout
    assert "LoRA r=16 on q,k,v,o,gate,up,down: " in run.stdout
    base = tmp_path / "home" / "engine-runs" / "llama2-7b" / "checkpoints"  # pretrain's
    assert run.stderr.splitlines() == [f"error: --pretrained-checkpoint: {base} not found"]

    # One GPU a node: TP 1, so no sequence parallelism; a directory without a checkpoint.
    empty = tmp_path / "empty"
    empty.mkdir()
    run = dry_run(LORA, tmp_path, NNODES=2, GPUS_PER_NODE=1, SFT_DATA=chats,
                  TOKENIZER_MODEL=tokenizer, PRETRAINED_CHECKPOINT=empty)  # fmt: skip
    assert "layout: world 2 = TP 1 x PP 1 x DP 2" in run.stdout, run.stdout + run.stderr
    assert "sequence parallel off" in run.stdout
    assert f"error: --pretrained-checkpoint: {empty} holds no checkpoint" in run.stderr


def test_torchrun_trains_lora_adapters_on_a_base_and_resumes_them(corpus, tokenizer, tmp_path):  # noqa: F811
    home, base = tmp_path / "home", tmp_path / "base"
    env = recipe_env(home)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    pretrain = [*torchrun, "--nproc-per-node", "1", str(REPO / "examples" / "pretrain.py"),
                *TINY, "--train-iters", "2", "--data-path", corpus, "--tokenizer-type",
                "Llama2Tokenizer", "--tokenizer-model", tokenizer, "--save", str(base)]  # fmt: skip
    run = subprocess.run(pretrain, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    chats = tmp_path / "chats.jsonl"
    topics = list(pydoc_data.topics.topics.items())[:64]
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {name}?"},
        {"role": "assistant", "content": text[:200]},
    ]}) + "\n" for name, text in topics))  # fmt: skip
    env = recipe_env(home, SFT_DATA=chats, TOKENIZER_MODEL=tokenizer, PRETRAINED_CHECKPOINT=base)
    # Two iterations a start: the second start resumes at 2 and goes on to 4.
    command = [*torchrun, "--nproc-per-node", "2", str(LORA), *TINY,
               "--train-iters", "4", "--exit-interval", "2"]  # fmt: skip
    adapters = home / "engine-runs" / "llama2-7b-lora" / "adapters"
    for start, iterations in ((1, [1, 2]), (2, [3, 4])):
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        log = run.stdout + run.stderr
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        assert sorted(losses(run.stdout)) == iterations, run.stdout
        assert f"outputs: adapters in {adapters}" in run.stderr
        assert f"the base {base}" in log
        resumed = f"the adapters {adapters / 'iter_0000002'} at iteration 2"
        assert (resumed in log) == (start == 2), log
        assert (f"no checkpoint in --load {adapters} yet: new adapters" in log) == (start == 1)
        latest = iterations[-1]
        assert (adapters / "latest_checkpointed_iteration.txt").read_text() == str(latest)
        metadata = json.loads((adapters / f"iter_{latest:07d}" / "metadata.json").read_text())
        assert metadata["lora_adapters"] is True
        # The recipe's layout: TP from torchrun's LOCAL_WORLD_SIZE, with sequence parallelism.
        config = metadata["config"]
        assert config["parallel"]["tensor_model_parallel_size"] == 2
        assert config["model"]["sequence_parallel"] and config["lora"]["rank"] == 16
