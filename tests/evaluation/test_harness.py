"""The lm-evaluation-harness adapter (`engine.inference.harness`) against lm_eval's own ``hf``
model on the same weights.

A random `transformers` LLaMA (LLaMA-2 vocabulary, sharpened output layer) is converted to an
engine checkpoint saved at TP=2. Three local tasks (YAML written here over local JSONL: no
download) run through lm_eval's `simple_evaluate`: multiple choice from Shakespeare's lines,
rolling log-likelihood of passages longer than the model's 256 positions (several windows),
and greedy generation cut at a newline. The engine model on gloo ranks at TP=2, PP=2 and
DP=2 must give the ``hf`` model's scores and, request for request, its log-likelihoods
(within 1e-4), greedy flags and generated texts; then the same through
``tools/lm_eval_harness.py`` under torchrun.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.conversion.convert import hf_to_engine
from engine.data.tokenizer import build_tokenizer
from tests.paths import REPO, SHARED_DATA
from tests.rank_pool import module_pool

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test extra")
from lm_eval.tasks import TaskManager  # noqa: E402

TOKENIZER = SHARED_DATA / "llama2-tokenizer.model"
TEXT = SHARED_DATA / "tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(
    not (TOKENIZER.exists() and TEXT.exists()), reason=f"needs {TOKENIZER} and {TEXT}"
)
TASKS = ["engine_choice", "engine_rolling", "engine_generation"]
pool = module_pool(2)

TASK_YAML = {
    "engine_choice": """
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "engine_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "engine_generation": """
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(directory: Path) -> None:
    """The three tasks' JSONL (from Shakespeare) and YAML files in ``directory``."""
    lines = [line for line in TEXT.read_text().splitlines() if len(line.split()) >= 4][:200]
    text = TEXT.read_text()
    records = {
        "engine_choice": [
            {
                "context": lines[i],
                "choices": [lines[i + 1], lines[i + 7], lines[i + 13], lines[i + 29]],
                "answer": i % 4,
            }  # fmt: skip
            for i in range(0, 60, 6)
        ],
        "engine_rolling": [  # 300 to 1,550 characters: up to two windows
            {"text": text[2000 * i : 2000 * i + 300 + 250 * i]} for i in range(6)
        ],
        "engine_generation": [
            {"prompt": lines[i] + "\n", "answer": lines[i + 1]} for i in range(100, 110)
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    for task, rows in records.items():
        data = directory / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        header = (
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n"
        )
        (directory / f"{task}.yaml").write_text(header + TASK_YAML[task].format())


def evaluate(model: str, model_args: str, tasks_dir: str, batch_size: int = 3) -> dict | None:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=TaskManager(include_path=tasks_dir),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, tasks directory, the hf model's results, the HF directory)."""
    tmp = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )).eval()  # fmt: skip
    with torch.no_grad():  # sharper predictions than the near-uniform initialisation
        hf.lm_head.weight.mul_(6)
    hf.save_pretrained(tmp / "hf")
    shutil.copyfile(TOKENIZER, tmp / "hf" / "tokenizer.model")  # the checkpoint records it
    checkpoint = tmp / "engine"
    hf_to_engine(tmp / "hf", checkpoint, tp_size=2)
    write_tasks(tmp / "tasks")
    reference = evaluate("hf", f"pretrained={tmp / 'hf'},dtype=float32", str(tmp / "tasks"))
    return str(checkpoint), str(tmp / "tasks"), reference, tmp / "hf"


def engine_results(checkpoint: str, tasks_dir: str, tp: int, pp: int) -> dict | None:
    """simple_evaluate with the engine model on every rank of the pool (rank 0's results)."""
    import engine.inference.harness  # noqa: F401  (registers "engine")
    from engine import parallel_state

    try:
        args = f"checkpoint={checkpoint},tensor_parallel={tp},pipeline_parallel={pp}"
        return evaluate("engine", args, tasks_dir)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def assert_same_results(ours: dict, reference: dict) -> None:
    """Scores within 1e-4 (relative) and, per document, every request's response."""
    for task in TASKS:
        expected, got = reference["results"][task], ours["results"][task]
        for metric, value in expected.items():
            if isinstance(value, float) and not metric.endswith("_stderr,none"):
                assert got[metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)
        samples = {s["doc_id"]: s for s in ours["samples"][task]}
        assert len(samples) == len(reference["samples"][task])
        for sample in reference["samples"][task]:
            mine = samples[sample["doc_id"]]
            assert mine["arguments"] == sample["arguments"], (task, sample["doc_id"])
            for want, have in zip(sample["resps"], mine["resps"], strict=True):
                if task == "engine_generation":
                    assert have == want, (task, sample["doc_id"])
                    continue
                want, have = want[0], have[0]
                if task == "engine_choice":  # (log-likelihood, greedy)
                    assert have[1] == want[1], (task, sample["doc_id"])
                    want, have = want[0], have[0]
                # float32 sums of hundreds of tokens (hf) against float64 (ours): relative
                assert have == pytest.approx(want, rel=1e-6, abs=1e-4), (task, sample["doc_id"])


def test_reference_exercises_every_kind_of_request(setup):
    _, _, reference, _ = setup
    generated = [s["resps"][0][0] for s in reference["samples"]["engine_generation"]]
    assert any(generated), "the random model generates only empty strings"
    rolling = reference["samples"]["engine_rolling"]
    tokenizer = build_tokenizer("Llama2Tokenizer", TOKENIZER)
    longest = max(len(tokenizer.tokenize(s["doc"]["text"])) for s in rolling)
    assert longest > 256, "no passage needs more than one window"
    choice = reference["results"]["engine_choice"]
    assert math.isfinite(choice["acc,none"])


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_engine_model_matches_hf_model(setup, pool, tp, pp):
    checkpoint, tasks_dir, reference, _ = setup
    results = pool.run(engine_results, checkpoint, tasks_dir, tp, pp)
    assert results[1] is None  # lm_eval reports on global rank 0 only
    assert_same_results(results[0], reference)


def test_command_line_under_torchrun(setup, tmp_path):
    checkpoint, tasks_dir, reference, _ = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENGINE_PROGRESS_INTERVAL_S": "0.001"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tools" / "lm_eval_harness.py"), "--model", "engine",
         "--model_args", f"checkpoint={checkpoint},tensor_parallel=2",
         "--tasks", "engine_choice", "--include_path", tasks_dir, "--batch_size", "4",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [written] = list((tmp_path / "out").rglob("results_*.json"))
    scores = json.loads(written.read_text())["results"]["engine_choice"]
    for metric in ("acc,none", "acc_norm,none"):
        assert scores[metric] == pytest.approx(reference["results"]["engine_choice"][metric])
    assert "engine_choice" in result.stdout  # lm_eval's table, printed once by rank 0
    # Progress on stderr from rank 0: 10 questions x 4 choices.
    progress = [line for line in result.stderr.splitlines() if line.startswith("loglikelihood: [")]
    assert progress and "100.0% 40/40 requests | " in progress[-1], result.stderr[-2000:]


def bos_requests(checkpoint: str) -> tuple[list[int], list[int], list[int], float]:
    """With ``add_bos_token=True``: encodings with and without special tokens, the default
    one, and the log-likelihood of a continuation of the empty context."""
    from lm_eval.api.instance import Instance

    from engine import parallel_state
    from engine.inference.harness import EngineLM

    try:
        lm = EngineLM(checkpoint, add_bos_token=True)
        request = Instance("loglikelihood", {}, ("", " Hello world, said he"), 0)
        [(logp, _)] = lm.loglikelihood([request])
        plain = lm.tok_encode("Hello world", add_special_tokens=False)
        return lm.tok_encode("Hello world"), plain, lm.tok_encode("Hello", True), logp
    finally:
        parallel_state.destroy_model_parallel()


def test_bos_token_is_added_or_stripped_as_asked(setup, pool):
    checkpoint, _, _, hf_dir = setup
    with_bos, plain, forced, logp = pool.run(bos_requests, checkpoint)[0]
    tokenizer = build_tokenizer("Llama2Tokenizer", TOKENIZER)
    assert with_bos == [tokenizer.bos] + tokenizer.tokenize("Hello world")
    assert plain == tokenizer.tokenize("Hello world") and forced[0] == tokenizer.bos
    # An empty context is BOS (the prefix token): transformers' own log-softmax on [BOS] + ids.
    ids = tokenizer.tokenize(" Hello world, said he")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(torch.tensor([[tokenizer.bos] + ids])).logits[0], -1)
    expected = log_probs[:-1].gather(1, torch.tensor(ids)[:, None]).sum().item()
    assert logp == pytest.approx(expected, abs=1e-4)


def wrong_layout(checkpoint: str) -> str:
    from engine import parallel_state
    from engine.inference.harness import EngineLM

    parallel_state.initialize_model_parallel(2, 1)
    try:
        EngineLM(checkpoint, tensor_parallel=1)
    except ValueError as error:
        return str(error)
    finally:
        parallel_state.destroy_model_parallel()
    return "no error"


def test_bad_model_args_are_named(setup, pool):
    from engine.inference.harness import EngineLM

    with pytest.raises(ValueError, match="--batch_size 'auto': the engine model takes a positive"):
        EngineLM(setup[0], batch_size="auto")  # before any process group starts
    message = pool.run(wrong_layout, setup[0])[0]
    assert message == (
        "tensor_parallel=1, pipeline_parallel=1 in --model_args, but the parallel state already "
        "runs TP=2, PP=1"
    )


def test_tool_without_lm_eval_names_the_extra():
    # `None` in sys.modules makes `import lm_eval` fail as if it were not installed.
    prelude = (
        "import runpy, sys; sys.modules['lm_eval'] = None; "
        "sys.argv = ['tools/lm_eval_harness.py', '--model', 'engine']; "
        "runpy.run_path('tools/lm_eval_harness.py', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    assert "needs lm-evaluation-harness" in result.stderr
    assert "pip install -e '.[eval]'" in result.stderr
