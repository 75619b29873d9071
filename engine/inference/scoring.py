"""Scored generation tasks (`tools/evaluate.py --task generation`): the examples and the metrics.

**Examples.** ``--data-path`` is JSONL, one example a line (blank lines skipped):
``{"prompt": str, "answer": str | [str, ...]}`` (QA style: a list holds every acceptable
answer), or ``{"prompt": str}`` lines with ``--references FILE``, a text file of one reference
per line, line ``i`` for example ``i`` (translation, summaries). The references come from one
place: ``--references`` with ``"answer"`` keys is an error, as is a missing key, a count
mismatch or a value of the wrong type; each names the file, the line and what was expected.

**Metrics** (`METRICS`), every one computed on the output exactly as written:

- ``bleu`` / ``chrf``: sacrebleu's ``corpus_bleu`` / ``corpus_chrf`` with their defaults
  (13a tokenisation; chrF's character 6-grams, beta 2), 0-100. An example with several
  answers gives them all as references (sacrebleu's multi-reference form; streams padded with
  None). Per example: ``sentence_bleu`` / ``sentence_chrf`` (the corpus score is not their
  mean).
- ``exact_match``: 1 when the normalised output equals a normalised answer, else 0.
- ``accuracy``: 1 when a normalised answer occurs in the normalised output as whole words
  (``"paris"`` in ``"it is paris"``, not in ``"parisian"``; so an output that starts with the
  answer counts), else 0. An answer that normalises to nothing matches only an output that
  does too.

Normalisation is SQuAD's (``normalize_answer`` of its evaluation script): lower case, drop
punctuation, drop the articles *a*, *an*, *the*, collapse whitespace. The corpus value of
exact match and accuracy is the mean over examples (0-1).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("bleu", "chrf", "exact_match", "accuracy")
SACREBLEU_METRICS = ("bleu", "chrf")


class ScoringError(ValueError):
    """Bad task input (examples, references or metric names), in one line."""


@dataclass
class Example:
    """One prompt and what a right output is."""

    prompt: str
    answers: list[str]
    """Acceptable outputs (references), at least one."""
    given: str | list[str]
    """The answer as the input wrote it (a string or a list), echoed in the outputs."""


def parse_metrics(text: str) -> list[str]:
    """``--metric`` (a comma list) as names of `METRICS`, checked: sacrebleu must import for
    bleu / chrf."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ScoringError(
            f"--metric {text!r}: unknown {', '.join(unknown) or '(none given)'}; expected a "
            f"comma list of {', '.join(METRICS)}"
        )
    if any(name in SACREBLEU_METRICS for name in names):
        try:
            import sacrebleu  # noqa: F401
        except ImportError:
            raise ScoringError(
                "--metric bleu/chrf needs sacrebleu: pip install -e '.[eval]'"
            ) from None
    return list(dict.fromkeys(names))  # each once, in the order given


def read_examples(path: str | Path, references: str | Path | None = None) -> list[Example]:
    """The examples of a task (see the module docstring), checked before any model loads."""
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ScoringError(f"--data-path {path}: cannot read it ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise ScoringError(f'{path}:{number}: expected a JSON object {{"prompt": ...}}')
        rows.append((number, record))
    if not rows:
        raise ScoringError(f"--data-path {path}: no examples (expected JSONL, one a line)")
    for number, record in rows:
        if not isinstance(record.get("prompt"), str):
            raise ScoringError(f'{path}:{number}: no key "prompt" with a string value')
    if references is not None:
        return _with_references(path, rows, references)
    examples = []
    for number, record in rows:
        if "answer" not in record:
            raise ScoringError(
                f'{path}:{number}: no key "answer" (or give --references FILE, one a line)'
            )
        given = record["answer"]
        answers = [given] if isinstance(given, str) else given
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise ScoringError(
                f'{path}:{number}: "answer" must be a string or a non-empty list of strings'
            )
        examples.append(Example(record["prompt"], list(answers), given))
    return examples


def _with_references(
    path: str | Path, rows: list[tuple[int, dict[str, Any]]], references: str | Path
) -> list[Example]:
    for number, record in rows:
        if "answer" in record:
            raise ScoringError(
                f'{path}:{number} has an "answer" and --references {references} is given: '
                "give the references in one place"
            )
    try:
        lines = Path(references).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ScoringError(f"--references {references}: cannot read it ({error})") from None
    if len(lines) != len(rows):
        raise ScoringError(
            f"--references {references} has {len(lines)} lines but --data-path {path} has "
            f"{len(rows)} examples: expected one reference per example"
        )
    return [Example(r["prompt"], [ref], ref) for (_, r), ref in zip(rows, lines, strict=True)]


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(c for c in text if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(output: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised output equals a normalised answer, else 0.0."""
    normalised = normalize_answer(output)
    return float(any(normalised == normalize_answer(a) for a in answers))


def accuracy(output: str, answers: Sequence[str]) -> float:
    """1.0 when a normalised answer occurs in the normalised output as whole words, else 0.0
    (an answer that normalises to nothing matches an output that does too)."""
    words = f" {normalize_answer(output)} "
    for answer in answers:
        normalised = normalize_answer(answer)
        if (f" {normalised} " in words) if normalised else words == "  ":
            return 1.0
    return 0.0


def _reference_streams(answers: Sequence[Sequence[str]]) -> list[list[Any]]:
    """sacrebleu's reference streams: stream j holds each example's j-th answer (None when it
    has fewer, which sacrebleu skips though its annotations say str)."""
    depth = max(len(a) for a in answers)
    return [[a[j] if j < len(a) else None for a in answers] for j in range(depth)]


def corpus_bleu(outputs: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100) of the outputs against each example's answers."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(outputs), _reference_streams(answers)).score)


def corpus_chrf(outputs: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus chrF (0-100) of the outputs against each example's answers."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(outputs), _reference_streams(answers)).score)


def example_scores(output: str, answers: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    """Each metric of one example: sentence BLEU / chrF (sacrebleu), exact match, accuracy."""
    scores: dict[str, float] = {}
    for name in metrics:
        if name == "bleu":
            import sacrebleu

            scores[name] = float(sacrebleu.sentence_bleu(output, list(answers)).score)
        elif name == "chrf":
            import sacrebleu

            scores[name] = float(sacrebleu.sentence_chrf(output, list(answers)).score)
        elif name == "exact_match":
            scores[name] = exact_match(output, answers)
        else:
            scores[name] = accuracy(output, answers)
    return scores


def corpus_scores(
    outputs: Sequence[str], examples: Sequence[Example], metrics: Sequence[str]
) -> dict[str, float]:
    """The corpus value of each metric: BLEU / chrF over the corpus, the mean of exact match
    and accuracy."""
    answers = [e.answers for e in examples]
    scores: dict[str, float] = {}
    for name in metrics:
        if name == "bleu":
            scores[name] = corpus_bleu(outputs, answers)
        elif name == "chrf":
            scores[name] = corpus_chrf(outputs, answers)
        else:
            metric = exact_match if name == "exact_match" else accuracy
            values = [metric(o, a) for o, a in zip(outputs, answers, strict=True)]
            scores[name] = sum(values) / len(values)
    return scores
