"""`tools/evaluate.py --task generation` end to end, and the metrics of
`engine.inference.scoring` against sacrebleu and hand-checked cases.

A random transformers LLaMA with the LLaMA-2 vocabulary is converted to an engine checkpoint
(`tests.inference.checkpoints`). The tool's greedy outputs must be the text
`tools/generate.py` prints for the same prompts and flags (also at TP=2 under torchrun); its
BLEU / chrF must be sacrebleu's corpus scores recomputed from the written outputs and the
references; exact match and accuracy must be a recount of the written file, with references
made equal to (or containing words of) some outputs so the scores are not all zero; bad
inputs end the run with one line naming the problem before any model loads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.inference.scoring import (
    accuracy,
    corpus_bleu,
    corpus_chrf,
    exact_match,
    normalize_answer,
    parse_metrics,
)
from tests.inference.checkpoints import TOKENIZER, converted_checkpoint
from tests.paths import REPO

sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu is the eval extra")
pytest.importorskip("transformers", reason="transformers is a test extra")

PROMPTS = [
    "First Citizen: Before we proceed any further,",
    "To be, or not to be",
    "The quality of mercy is not",
    "Now is the winter of our discontent",
    "All the world's a stage, and",
]
# The decoding flags of both tools: greedy, batches of 2 (the last one short).
FLAGS = ["--max-new-tokens", "8", "--micro-batch-size", "2"]
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"needs {TOKENIZER}")


def run_tool(*args: str, torchrun: int = 0, **env: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
    return subprocess.run(
        [sys.executable, *(launcher if torchrun else []), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The checkpoint, the prompts file and tools/generate.py's greedy outputs."""
    tmp = tmp_path_factory.mktemp("scoring")
    checkpoint, _ = converted_checkpoint(tmp, tp_size=2)
    prompts_file = tmp / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    result = run_tool("tools/generate.py", "--load", str(checkpoint), "--prompts-file",
                      str(prompts_file), *FLAGS, ENGINE_PROGRESS_INTERVAL_S="0.001")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Three batches: their progress on stderr, apart from the text.
    progress = [line for line in result.stderr.splitlines() if line.startswith("generate: [")]
    assert len(progress) >= 3 and "100.0% 5/5 prompts" in progress[-1], result.stderr
    assert "generate:" not in result.stdout
    # Each prompt prints as "--- prompt i ---\n{prompt}{output}\n".
    blocks = re.split(r"--- prompt (\d+) ---\n", result.stdout)[1:]
    printed = {
        int(i): text.removesuffix("\n") for i, text in zip(blocks[::2], blocks[1::2], strict=True)
    }
    assert sorted(printed) == list(range(len(PROMPTS)))
    outputs = []
    for i, prompt in enumerate(PROMPTS):
        assert printed[i].startswith(prompt)
        outputs.append(printed[i][len(prompt) :])
    assert all(o.strip() for o in outputs), outputs  # something to compare and score
    return {"tmp": tmp, "checkpoint": str(checkpoint), "generated": outputs}


def written(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary_of(stdout: str) -> dict[str, float]:
    """``bleu X | chrf Y | ... | examples N`` as a dict."""
    line = stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in (field.split() for field in line.split(" | "))}


@needs_tokenizer
def test_references_bleu_chrf_are_sacrebleus_and_outputs_are_generates(task):
    """--references: outputs equal tools/generate.py's; BLEU and chrF equal sacrebleu's corpus
    scores of the written outputs; the progress reaches stderr as log lines."""
    tmp, generated = task["tmp"], task["generated"]
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    references = tmp / "references.txt"
    # Reference 0 is the output itself (BLEU > 0), reference 1 shares its first half.
    half = generated[1][: len(generated[1]) // 2]
    refs = [generated[0], half + " and more", "mercy droppeth", "made glorious summer",
            "all the men and women merely players"]  # fmt: skip
    references.write_text("\n".join(r.replace("\n", " ") for r in refs) + "\n")
    out = tmp / "bleu" / "outputs.jsonl"
    result = run_tool(
        "tools/evaluate.py", "--task", "generation", "--load", task["checkpoint"],
        "--data-path", str(data), "--references", str(references), "--metric",
        "bleu,chrf,exact_match,accuracy", "--output", str(out), *FLAGS,
        ENGINE_PROGRESS_INTERVAL_S="0.001",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = written(out)
    assert [r["output"] for r in records] == generated
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["reference"] for r in records] == references.read_text().splitlines()
    hyps, refs = [r["output"] for r in records], [r["reference"] for r in records]
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    chrf = sacrebleu.corpus_chrf(hyps, [refs]).score
    assert bleu > 0 and chrf > 0
    scores = json.loads(Path(f"{out}.scores.json").read_text())
    assert scores["bleu"] == pytest.approx(bleu, abs=1e-9)
    assert scores["chrf"] == pytest.approx(chrf, abs=1e-9)
    assert scores["exact_match"] == 1 / len(PROMPTS) and scores["examples"] == len(PROMPTS)
    summary = summary_of(result.stdout)
    assert summary["bleu"] == pytest.approx(bleu, abs=1e-6)
    assert summary["chrf"] == pytest.approx(chrf, abs=1e-6)
    assert summary["exact_match"] == pytest.approx(0.2) and summary["examples"] == 5
    for record in records:  # per example: sacrebleu's sentence scores
        assert (
            record["bleu"] == sacrebleu.sentence_bleu(record["output"], [record["reference"]]).score
        )
        assert (
            record["chrf"] == sacrebleu.sentence_chrf(record["output"], [record["reference"]]).score
        )
    progress = [line for line in result.stderr.splitlines() if line.startswith("generation: [")]
    assert progress and "100.0% 5/5 prompts" in progress[-1] and "prompts/s" in progress[-1]
    assert "\r" not in result.stderr  # not a terminal: lines, not redraws


@needs_tokenizer
def test_qa_exact_match_and_accuracy_recount_at_tp2(task):
    """QA JSONL with answer lists, under torchrun at TP=2: the same greedy outputs, and exact
    match / accuracy equal a recount of the written file."""
    tmp, generated = task["tmp"], task["generated"]
    first_word = normalize_answer(generated[2]).split()[0]
    answers = [
        ["no such answer", generated[0]],  # exact match (the second answer)
        generated[1].upper() + "!",  # exact match after normalisation
        [first_word],  # contained as a word: accuracy only (unless it is all of it)
        "certainly not this",
        ["neither", "nor this"],
    ]
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                            for p, a in zip(PROMPTS, answers, strict=True)))  # fmt: skip
    out = tmp / "qa" / "outputs.jsonl"
    result = run_tool(
        "tools/evaluate.py", "--task", "generation", "--load", task["checkpoint"],
        "--data-path", str(data), "--metric", "exact_match,accuracy", "--output", str(out),
        "--tensor-model-parallel-size", "2", *FLAGS, torchrun=2,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = written(out)
    assert [r["output"] for r in records] == generated
    assert [r["answer"] for r in records] == answers
    for record in records:
        listed = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
        assert record["exact_match"] == exact_match(record["output"], listed)
        assert record["accuracy"] == accuracy(record["output"], listed)
    em = sum(r["exact_match"] for r in records) / len(records)
    acc = sum(r["accuracy"] for r in records) / len(records)
    assert em >= 0.4 and acc >= 0.6 and [r["exact_match"] for r in records][:2] == [1.0, 1.0]
    summary = summary_of(result.stdout)
    assert summary == {"exact_match": pytest.approx(em), "accuracy": pytest.approx(acc),
                       "examples": 5}  # fmt: skip


@needs_tokenizer
def test_data_parallel_replicas_share_the_prompts(task):
    """Two replicas (DP=2 under torchrun), 2 prompts a batch (FLAGS): replica 0 decodes
    batches 0 and 2, replica 1 batch 1; rank 0 gathers them into the single run's outputs, in
    order."""
    tmp = task["tmp"]
    data = tmp / "dp.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in PROMPTS))
    out = tmp / "dp" / "outputs.jsonl"
    result = run_tool(
        "tools/evaluate.py", "--task", "generation", "--load", task["checkpoint"],
        "--data-path", str(data), "--output", str(out), *FLAGS,
        torchrun=2, ENGINE_PROGRESS_INTERVAL_S="0.001",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["output"] for r in written(out)] == task["generated"]
    progress = [line for line in result.stderr.splitlines() if line.startswith("generation: [")]
    assert progress and "100.0% 3/3 prompts" in progress[-1]  # rank 0's share: batches 0, 2


def evaluate_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The tool's one-line error (it exits 2 before any model loads)."""
    from tools.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "generation", "--load", "/nonexistent/checkpoint", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_inputs_fail_with_one_line_before_loading(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": ["d"]}\n')
    line = evaluate_error(capsys, "--data-path", str(data), "--metric", "bleu,rouge")
    assert "--metric 'bleu,rouge': unknown rouge; expected a comma list of bleu, chrf" in line
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    line = evaluate_error(capsys, "--data-path", str(no_answer))
    assert f'{no_answer}:2: no key "answer"' in line
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text('{"question": "a", "answer": "b"}\n')
    assert f'{no_prompt}:1: no key "prompt"' in evaluate_error(
        capsys, "--data-path", str(no_prompt)
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n')
    references = tmp_path / "refs.txt"
    references.write_text("x\ny\n")
    line = evaluate_error(capsys, "--data-path", str(prompts), "--references", str(references))
    assert f"--references {references} has 2 lines but --data-path {prompts} has 3" in line
    line = evaluate_error(capsys, "--data-path", str(data), "--references", str(references))
    assert "give the references in one place" in line
    line = evaluate_error(capsys, "--data-path", str(data), "--top-p", "0")
    assert "--top-p (0.0) must be in (0, 1]" in line
    line = evaluate_error(capsys, "--task", "perplexity", "--data-path", str(data))
    assert "--task perplexity needs --seq-length" in line


def test_normalisation_exact_match_and_accuracy_by_hand():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("The answer is: Paris.", ["paris"]) == 0.0
    assert exact_match(" Paris.", ["london", "the paris"]) == 1.0
    assert accuracy("The answer is: Paris.", ["paris"]) == 1.0
    assert accuracy("Parisian food", ["paris"]) == 0.0  # whole words only
    assert accuracy("paris is big", ["Paris is"]) == 1.0  # starts with it
    assert accuracy("", ["the"]) == 1.0 and accuracy("x", ["a"]) == 0.0  # empty answers
    assert parse_metrics(" chrf,bleu,chrf ") == ["chrf", "bleu"]


def test_corpus_bleu_and_chrf_are_sacrebleus_with_several_references():
    outputs = ["the cat sat on the mat", "a dog barked loudly at night", "hello world"]
    answers = [["the cat sat on a mat", "a cat sat on the mat"], ["a dog barked at night"],
               ["hello there world", "hi world", "hello world!"]]  # fmt: skip
    streams = [[a[j] if j < len(a) else None for a in answers] for j in range(3)]
    assert corpus_bleu(outputs, answers) == sacrebleu.corpus_bleu(outputs, streams).score
    assert corpus_chrf(outputs, answers) == sacrebleu.corpus_chrf(outputs, streams).score
    # More references can only help BLEU here; an exact copy scores 100.
    first = [[a[0]] for a in answers]
    assert (
        corpus_bleu(outputs, first)
        == sacrebleu.corpus_bleu(outputs, [[a[0] for a in answers]]).score
    )
    assert corpus_bleu(outputs, answers) > corpus_bleu(outputs, first)
    assert corpus_bleu(outputs, [[o] for o in outputs]) == pytest.approx(100.0)
