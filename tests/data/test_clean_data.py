"""`tools/clean_data.py` on a planted corpus (three files: JSONL, JSONL.gz, Parquet) of prose
made from the shared text, with exact and near duplicates, short, lorem-ipsum and malformed
records and PII:

- the report's counts are the planted ones and equal the removed documents; each reason's
  samples are written beside the output and are the removed records;
- the output is the same for 1 and 2 workers, and ``--shard 0/2``, ``1/2`` + ``--merge`` gives
  the single run's output, report and samples byte for byte;
- Parquet and .zst in give what the same records as JSONL give; Parquet and .zst out hold
  them;
- ``--mask-pii`` masks the planted addresses; the output feeds `tools/preprocess_data.py`;
- bad input is refused before any work with one line naming the flag or file; a run that
  keeps nothing exits non-zero.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.data.indexed_dataset import IndexedDataset
from tests.paths import REPO

TOOL = REPO / "tools" / "clean_data.py"
SHARED = REPO.parent / "shared" / "data"
BASES, EXACT, NEAR, SHORT = 240, 30, 30, 5


def prose(rng: random.Random, vocabulary: list[str], lines: int = 8) -> str:
    """Lines of 12 words from the shared text's vocabulary, with stop words, each a sentence:
    what the default quality filters keep."""
    rows = []
    for _ in range(lines):
        words = [rng.choice(vocabulary) for _ in range(10)]
        rows.append(" ".join(["The", *words[:5], "and", *words[5:]]) + ".")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Three input files and what was planted in them."""
    root = tmp_path_factory.mktemp("corpus")
    text = (SHARED / "tinyshakespeare.txt").read_text().lower()
    vocabulary = sorted({w.strip(".,;:!?'\"-") for w in text.split()} - {""})
    rng = random.Random(0)
    bases = [prose(rng, vocabulary) for _ in range(BASES)]
    records = [{"id": i, "text": t} for i, t in enumerate(bases)]
    for i in range(EXACT):
        records.append({"id": 1000 + i, "text": bases[i]})
    for i in range(NEAR):  # one word of about 100 changed: word 5-gram Jaccard about 0.9
        words = bases[EXACT + i].split(" ")
        words[rng.randrange(len(words))] = "changed"
        records.append({"id": 2000 + i, "text": " ".join(words)})
    for i in range(SHORT):
        records.append({"id": 3000 + i, "text": "Too short to keep."})
    records.append({"id": 4000, "text": bases[-1].replace("The", "Lorem ipsum", 1) + " x"})
    records.append({"id": 5000, "title": "no text field"})
    records.append({"id": 6000, "text": prose(rng, vocabulary) + "\nWrite to jane@example.org "
                    "or 10.0.0.1 and the team."})  # fmt: skip
    rng.shuffle(records)
    thirds = [records[: len(records) // 3], records[len(records) // 3 : 2 * len(records) // 3],
              records[2 * len(records) // 3 :]]  # fmt: skip
    paths = [root / "a.jsonl", root / "b.jsonl.gz", root / "c.parquet"]
    with open(paths[0], "w") as out:
        out.writelines(json.dumps(r) + "\n" for r in thirds[0])
        out.write("{not json\n")  # a malformed line
    with gzip.open(paths[1], "wt") as out:
        out.writelines(json.dumps(r) + "\n" for r in thirds[1])
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": r["id"], "text": r.get("text")} for r in thirds[2]]
    pq.write_table(pa.Table.from_pylist(rows), paths[2])
    return {"paths": [str(p) for p in paths], "records": len(records) + 1, "root": root}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                            cwd=REPO, timeout=300)  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def outputs(prefix: Path) -> dict[str, bytes]:
    """The output, its report and every sample file, by name."""
    files = {"output": prefix.read_bytes(),
             "report": Path(f"{prefix}.report.json").read_bytes()}  # fmt: skip
    for sample in sorted(Path(f"{prefix}.removed").glob("*.jsonl")):
        files[sample.name] = sample.read_bytes()
    return files


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "clean.jsonl"
    run("--input", *corpus["paths"], "--output", str(out), "--workers", "1")
    return out


def test_the_report_counts_what_was_planted_and_samples_it(corpus, single):
    report = json.loads(Path(f"{single}.report.json").read_text())
    kept = [json.loads(line) for line in single.read_text().splitlines()]
    assert report["documents"] == corpus["records"]
    assert report["kept_documents"] == len(kept) == BASES + 1  # the bases and the PII page
    removed = report["removed"]
    assert removed["exact_dedup"]["exact_duplicate"][0] == EXACT
    assert removed["near_dedup"]["near_duplicate"][0] == NEAR
    assert removed["quality"] == {"too_few_words": [SHORT, SHORT * 18],
                                  "lorem_ipsum": removed["quality"]["lorem_ipsum"]}  # fmt: skip
    assert removed["input"]["malformed_line"][0] == 1
    assert removed["input"]["no_text"][0] == 1  # the record without it
    counted = sum(d for reasons in removed.values() for d, _ in reasons.values())
    assert counted == report["documents"] - report["kept_documents"]
    kept_texts = {r["text"] for r in kept}
    samples = Path(f"{single}.removed")
    duplicates = [json.loads(line) for line in (samples / "exact_duplicate.jsonl").open()]
    assert len(duplicates) == 20 and all(d["text"] in kept_texts for d in duplicates)
    assert [json.loads(x)["text"] for x in (samples / "too_few_words.jsonl").open()] == [
        "Too short to keep."
    ] * SHORT


def test_workers_and_shards_give_the_single_run(corpus, single, tmp_path):
    two = tmp_path / "two" / "clean.jsonl"
    run("--input", *corpus["paths"], "--output", str(two), "--workers", "2")
    assert outputs(two) == outputs(single)
    work = tmp_path / "work"
    for i in range(2):
        run("--input", *corpus["paths"], "--shard", f"{i}/2", "--work-dir", str(work))
    merged = tmp_path / "merged" / "clean.jsonl"
    run("--merge", "--work-dir", str(work), "--output", str(merged))
    assert outputs(merged) == outputs(single)


def test_merge_refuses_missing_shards_and_other_settings(corpus, tmp_path):
    work = tmp_path / "work"
    run("--input", *corpus["paths"], "--shard", "0/2", "--work-dir", str(work))
    result = run("--merge", "--work-dir", str(work), "--output", str(tmp_path / "o.jsonl"),
                 check=False)  # fmt: skip
    assert result.returncode != 0 and "holds 2 of the corpus's 3 files" in result.stderr
    run("--input", *corpus["paths"], "--shard", "1/2", "--work-dir", str(work))
    result = run("--merge", "--work-dir", str(work), "--output", str(tmp_path / "o.jsonl"),
                 "--minhash-threshold", "0.5", check=False)  # fmt: skip
    assert result.returncode != 0 and "was made with other settings" in result.stderr


def test_parquet_and_zstandard_in_and_out(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    source = corpus["paths"][2]
    as_jsonl = tmp_path / "c.jsonl"
    as_jsonl.write_text("".join(json.dumps(r) + "\n" for r in pq.read_table(source).to_pylist()))
    from_parquet, from_jsonl = tmp_path / "p" / "o.jsonl", tmp_path / "j" / "o.jsonl"
    run("--input", source, "--output", str(from_parquet))
    run("--input", str(as_jsonl), "--output", str(from_jsonl))
    assert from_parquet.read_bytes() == from_jsonl.read_bytes()
    out = tmp_path / "o.parquet"
    run("--input", str(as_jsonl), "--output", str(out))
    rows = pq.read_table(out).to_pylist()
    assert rows == [json.loads(line) for line in from_jsonl.read_text().splitlines()]
    assert isinstance(pq.read_table(out), pa.Table)
    packed = tmp_path / "c.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(as_jsonl.read_bytes()))
    out = tmp_path / "z" / "o.jsonl.zst"
    run("--input", str(packed), "--output", str(out))
    unpacked = zstandard.ZstdDecompressor().stream_reader(out.open("rb")).read()
    assert unpacked == from_jsonl.read_bytes()


def test_arrow_in_and_a_corrupt_input_is_one_line(corpus, tmp_path):
    """HF datasets' cache files (Arrow IPC streams) read as their rows would as JSONL; a
    truncated .gz stops the run with the file's name, exit 2, no traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(corpus["paths"][2])
    arrow = tmp_path / "c.arrow"
    with pa.ipc.new_stream(str(arrow), table.schema) as stream:
        for batch in table.to_batches(max_chunksize=7):
            stream.write_batch(batch)
    from_arrow, from_parquet = tmp_path / "a" / "o.jsonl", tmp_path / "p" / "o.jsonl"
    run("--input", str(arrow), "--output", str(from_arrow))
    run("--input", corpus["paths"][2], "--output", str(from_parquet))
    assert from_arrow.read_bytes() == from_parquet.read_bytes()
    gz = next(p for p in corpus["paths"] if p.endswith(".gz"))
    broken = tmp_path / "broken.jsonl.gz"
    data = Path(gz).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    result = run("--input", str(broken), "--output", str(tmp_path / "b" / "o.jsonl"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"clean_data.py: error: --input {broken}: cannot read it"), last


def test_pii_masked_and_the_output_feeds_preprocess_data(corpus, tmp_path):
    out = tmp_path / "clean.jsonl"
    result = run("--input", *corpus["paths"], "--output", str(out), "--mask-pii")
    # The progress line (a log line when stderr is not a terminal) and the closing report.
    progress = [line for line in result.stderr.splitlines() if line.startswith("clean: ")]
    assert progress and " docs/s | " in progress[-1] and " MB/s | " in progress[-1]
    assert " | removed " in progress[-1]
    assert "exact_dedup: removed 30 documents" in result.stdout
    text = out.read_text()
    assert "jane@example.org" not in text and "<EMAIL>" in text and "<IP_ADDRESS>" in text
    kept = len(text.splitlines())
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                    str(out), "--output-prefix", str(tmp_path / "tok"), "--tokenizer-type",
                    "Llama2Tokenizer", "--tokenizer-model", str(SHARED / "llama2-tokenizer.model"),
                    "--append-eod", "--workers", "1"], check=True, capture_output=True,
                   cwd=REPO)  # fmt: skip
    assert len(IndexedDataset(str(tmp_path / "tok_text_document"))) == kept


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "missing.jsonl"], "--input missing.jsonl: no such file"),
        (["--quality", "min_wrds=3"], "--quality min_wrds=3: expected RULE=VALUE"),
        (["--quality", "min_words=many"], "--quality min_words=many: 'many' is not a valid"),
        (["--shard", "2/2", "--work-dir", "w"], "--shard 2/2: i must be in [0, n)"),
        (["--minhash-bands", "0"], "--minhash-bands must be at least 1, got 0"),
        (["--merge", "--work-dir", "nowhere"], "--merge needs --work-dir holding"),
    ],
)
def test_bad_flags_are_refused_with_one_line(corpus, tmp_path, args, message):
    base = ["--input", corpus["paths"][0], "--output", str(tmp_path / "o.jsonl")]
    result = run(*base, *args, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.jsonl").exists()


def test_keeping_nothing_exits_non_zero(corpus, tmp_path):
    out = tmp_path / "o.jsonl"
    result = run("--input", corpus["paths"][0], "--output", str(out), "--quality",
                 "min_words=100000", check=False)  # fmt: skip
    assert result.returncode == 1 and "no document of" in result.stderr
    assert json.loads(Path(f"{out}.report.json").read_text())["kept_documents"] == 0
