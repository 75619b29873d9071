"""`engine.progress.Progress`: the text (counts, rate, ETA, fields), when it is written to a log
(a real `io.StringIO`, not a terminal) and how it is redrawn on a real pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from engine.progress import (
    INTERVAL_ENV,
    Progress,
    format_count,
    format_duration,
    interval_from_env,
)
from tests.paths import REPO, SHARED_DATA

LOG_EVERY_CALL = {**os.environ, INTERVAL_ENV: "0.001"}


def progress_lines(stderr: str, label: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{label}: ")]


class Clock:
    """Seconds set by the test, so rates and ETAs are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_durations_counts_and_the_environment(monkeypatch):
    assert format_duration(0) == "0:00:00"
    assert format_duration(59.9) == "0:00:59"
    assert format_duration(3661) == "1:01:01"
    assert format_duration(100 * 3600 + 5) == "100:00:05"
    assert format_count(7965) == "7,965" and format_count(1.25) == "1.2"
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval_from_env() == 30.0
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert interval_from_env() == 0.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=rf"\${INTERVAL_ENV}='soon': expected a number"):
        interval_from_env()


def test_line_with_a_total_has_the_bar_rate_and_eta():
    clock = Clock()
    progress = Progress(7965, "windows", label="perplexity", stream=io.StringIO(), clock=clock)
    clock.now += 40
    progress.update(advance=1000, fields={"nll/token": "10.39"})
    # 1,000 in 40 s: 25/s; 6,965 left take 278.6 s.
    assert progress.line() == (
        "perplexity: [##..................]  12.6% 1,000/7,965 windows | 25.0 windows/s | "
        "elapsed 0:00:40 | ETA 0:04:38 | nll/token 10.39"
    )
    assert progress.line(final=True).count("ETA") == 0


def test_line_without_a_total_scaled_units_and_counters():
    clock = Clock()
    progress = Progress(unit="docs", stream=io.StringIO(), clock=clock)
    clock.now += 4
    progress.update(1234, counters={"MB": 10.0}, fields={"removed": "12 (1.0%)"})
    assert progress.line() == (
        "1,234 docs | 308 docs/s | 2.50 MB/s | elapsed 0:00:04 | removed 12 (1.0%)"
    )
    by_bytes = Progress(3 * 2**20, "MB", scale=2**20, stream=io.StringIO(), clock=clock)
    clock.now += 2
    by_bytes.update(2**20)
    assert by_bytes.line().startswith("[######..............]  33.3% 1/3 MB | 0.50 MB/s | ")
    assert by_bytes.line().endswith("| ETA 0:00:04")


def test_a_log_gets_a_line_per_interval_and_one_final_line():
    clock, stream = Clock(), io.StringIO()
    assert not stream.isatty()
    progress = Progress(100, "it", stream=stream, interval_s=10, clock=clock)
    for _ in range(25):  # 1 s per item: lines at 10 s and 20 s
        clock.now += 1
        progress.update(advance=1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert " 10/100 it " in lines[0] and "ETA 0:01:30" in lines[0]
    progress.close()
    progress.close()  # once only
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and " 25/100 it " in lines[2] and "ETA" not in lines[2]
    # A log whose last line already shows the end gets no repeat of it.
    stream = io.StringIO()
    finished = Progress(2, stream=stream, interval_s=1, clock=clock)
    clock.now += 1
    finished.update(advance=2)
    finished.close()
    assert len(stream.getvalue().splitlines()) == 1


def test_disabled_writes_nothing():
    stream = io.StringIO()
    progress = Progress(10, stream=stream, enabled=False)
    progress.update(advance=5, force=True)
    progress.close()
    assert stream.getvalue() == ""


def test_a_terminal_is_redrawn_in_place():
    """A real pty: `isatty()` is true, lines start with a carriage return, a shorter line
    blanks what the longer one left, and `close` ends the line."""
    parent, child = os.openpty()
    try:
        with open(child, "w", closefd=False) as terminal:
            assert terminal.isatty()
            clock = Clock()
            progress = Progress(unit="docs", stream=terminal, interval_s=60, clock=clock)
            assert progress.interval_s < 1  # a terminal redraws often, whatever a log gets
            clock.now += 1
            progress.update(5, fields={"note": "a long field"})
            clock.now += 1
            progress.fields.clear()
            progress.update(10)
            progress.close()
        written = os.read(parent, 4096).decode()
    finally:
        os.close(parent)
        os.close(child)
    # The terminal's line discipline turns "\n" into "\r\n".
    first, second, final = written.removesuffix("\r\n").split("\r")[1:]
    assert first == "5 docs | 5.00 docs/s | elapsed 0:00:01 | note a long field"
    assert second.startswith("10 docs | 5.00 docs/s | elapsed 0:00:02")
    assert len(second) == len(first) and second.rstrip() == second[: len(second.rstrip())]
    assert final.rstrip() == "10 docs | 5.00 docs/s | elapsed 0:00:02"


def test_bad_arguments():
    with pytest.raises(ValueError, match="total must be >= 0"):
        Progress(-1)
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        Progress(1, interval_s=0, stream=io.StringIO())


def test_the_conversion_tool_counts_tensors(tmp_path):
    """hf-to-engine and engine-to-hf: log lines along the way, the last at every tensor."""
    pytest.importorskip("transformers", reason="transformers is a test extra")
    from safetensors import safe_open

    from tests.inference.checkpoints import random_llama

    random_llama().save_pretrained(tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        tensors = len(list(f.keys()))
    for command, load, save in (
        ("hf-to-engine", "hf", "engine"),
        ("engine-to-hf", "engine", "out"),
    ):
        result = subprocess.run(
            [sys.executable, "tools/convert_checkpoint.py", command, "--load-dir",
             str(tmp_path / load), "--save-dir", str(tmp_path / save)],
            cwd=REPO, capture_output=True, text=True, timeout=120, env=LOG_EVERY_CALL,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        lines = progress_lines(result.stderr, command)
        assert len(lines) > 1 and "ETA" in lines[0], result.stderr
        assert f"100.0% {tensors}/{tensors} tensors | " in lines[-1] and " MB/s | " in lines[-1]


@pytest.mark.skipif(not (SHARED_DATA / "llama2-tokenizer.model").exists(), reason="no tokenizer")
def test_preprocessing_shows_the_fraction_of_input_and_an_eta(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} " * 40}) + "\n" for i in range(3000)))
    result = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix",
         str(tmp_path / "out"), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
         str(SHARED_DATA / "llama2-tokenizer.model"), "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=LOG_EVERY_CALL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = progress_lines(result.stderr, "preprocess")
    assert len(lines) > 1 and "ETA" in lines[0] and " MB | " in lines[0], result.stderr
    assert "100.0%" in lines[-1] and "tokens/s" in lines[-1] and "documents 3,000" in lines[-1]
