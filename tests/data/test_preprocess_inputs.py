"""tools/preprocess_data.py's inputs and failures: Parquet and Arrow give the bytes of the same
records as JSONL; keys, tokenizer files and empty or garbage inputs are refused with one line
and an exit status, leaving earlier outputs as they were; long documents are tokenized in
pieces that give exactly the whole text's tokens, in bounded memory.

Everything runs for real: files written with pyarrow, the LLaMA-2 SentencePiece model, the
command line in a subprocess where the exit status and stderr are what is checked.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import long_texts
from engine.data.indexed_dataset import IndexedDataset
from engine.data.tokenizer import build_tokenizer
from tests.paths import REPO, SHARED_DATA
from tools import preprocess_data

pa = pytest.importorskip("pyarrow", reason="pyarrow is in the [test] extra")
pq = pytest.importorskip("pyarrow.parquet")

TOOL = str(REPO / "tools" / "preprocess_data.py")


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare_docs) -> str:
    """tinyshakespeare as it is (the fixture it depends on skips when it is absent)."""
    return (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")


def sp_flags(model: Path) -> list[str]:
    return ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(model)]


def run_tool(input_path, output_prefix, *flags) -> preprocess_data.Stats:
    """The tool in this process (`preprocess`, so a failure raises its SystemExit)."""
    argv = ["--input", input_path, "--output-prefix", output_prefix, *flags]
    return preprocess_data.preprocess(preprocess_data.get_args([str(a) for a in argv]))


def run_cli(*argv) -> subprocess.CompletedProcess:
    """The command line, as a user runs it."""
    return subprocess.run(
        [sys.executable, TOOL, *map(str, argv)], capture_output=True, text=True, timeout=120
    )


def output_bytes(prefix, key: str = "text") -> tuple[bytes, bytes]:
    return tuple(Path(f"{prefix}_{key}_document{s}").read_bytes() for s in (".bin", ".idx"))


@pytest.fixture(scope="module")
def records(shakespeare_docs) -> list[dict]:
    """Shakespeare paragraphs as records with a string key, a pre-split (list) key and an
    unused int column; an empty document and a null that JSONL and Arrow both skip."""
    rows = [
        {"id": i, "text": doc, "sentences": [s for s in doc.split("\n") if s][:3]}
        for i, doc in enumerate(shakespeare_docs[:600])
    ]
    rows[10]["text"] = ""  # kept: an empty document still gets its index entry
    rows[20]["sentences"] = ["one", "", "three"]  # the empty sentence is dropped
    rows[30]["text"] = None  # malformed in both formats: skipped and reported
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=128)
    return path


def write_arrow(path: Path, rows: list[dict], stream: bool = True) -> Path:
    """Arrow IPC in batches of 100 rows: the stream format (HF datasets' cache files), or the
    file format."""
    table = pa.Table.from_pylist(rows)
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with new(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=100):
            writer.write_batch(batch)
    return path


@pytest.mark.parametrize("partitions", [1, 3])
def test_parquet_and_arrow_give_the_bytes_of_the_same_jsonl(
    tmp_path, records, sp_model, partitions, monkeypatch
):
    # Small batches, so record batches are sliced by size as large rows would be.
    monkeypatch.setattr(preprocess_data, "_BATCH_BYTES", 16 << 10)
    sources = {
        "jsonl": write_jsonl(tmp_path / "in.jsonl", records),
        "parquet": write_parquet(tmp_path / "in.parquet", records),
        "stream": write_arrow(tmp_path / "in.arrow", records),
        "file": write_arrow(tmp_path / "in_file.arrow", records, stream=False),
    }
    flags = ["--json-keys", "text", "sentences", "--append-eod", "--partitions", partitions]
    stats = {}
    for name, source in sources.items():
        stats[name] = run_tool(source, tmp_path / name, *flags, *sp_flags(sp_model))
    for key in ("text", "sentences"):
        expected = output_bytes(tmp_path / "jsonl", key)
        for name in ("parquet", "stream", "file"):
            assert output_bytes(tmp_path / name, key) == expected, (name, key)
    for name, counted in stats.items():
        assert (counted.documents, counted.malformed) == (599, 1), name
    assert stats["parquet"].examples == [f"{sources['parquet']}: row 31: key 'text' is null"]
    ds = IndexedDataset(tmp_path / "parquet_sentences_document")
    assert ds.num_documents == 599 and len(ds.document(20)) > 0


def test_a_glob_mixing_formats_reads_file_by_file(tmp_path, records, sp_model):
    parts = [records[:150], records[150:300], records[300:450], records[450:]]
    write_jsonl(tmp_path / "part-0.jsonl", parts[0])
    write_parquet(tmp_path / "part-1.parquet", parts[1])
    write_arrow(tmp_path / "part-2.arrow", parts[2])
    write_parquet(tmp_path / "part-3.data", parts[3])  # no known suffix: found by its magic
    whole = write_jsonl(tmp_path / "whole.jsonl", records)
    # Partitions count lines and rows over all files, as Megatron's round robin does.
    flags = ["--append-eod", "--partitions", 2, *sp_flags(sp_model)]
    run_tool(tmp_path / "part-*", tmp_path / "mixed", *flags)
    run_tool(whole, tmp_path / "whole", *flags)
    assert output_bytes(tmp_path / "mixed") == output_bytes(tmp_path / "whole")


def test_pyarrow_is_imported_only_for_parquet_and_arrow(tmp_path, records, sp_model):
    jsonl = write_jsonl(tmp_path / "in.jsonl", records[:5])
    parquet = write_parquet(tmp_path / "in.parquet", records[:5])
    # A None entry in sys.modules makes `import pyarrow` fail, as it does without pyarrow.
    script = (
        "import sys; sys.modules['pyarrow'] = None; sys.path.insert(0, sys.argv[1]);"
        "from tools import preprocess_data; sys.exit(preprocess_data.main(sys.argv[2:]))"
    )
    results = {}
    for source in (jsonl, parquet):
        argv = ["--input", source, "--output-prefix", tmp_path / source.suffix[1:]]
        results[source.suffix] = subprocess.run(
            [sys.executable, "-c", script, REPO, *map(str, [*argv, *sp_flags(sp_model)])],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert results[".jsonl"].returncode == 0, results[".jsonl"].stderr
    assert results[".parquet"].returncode == 2
    assert results[".parquet"].stderr == (
        f"preprocess_data.py: error: --input {parquet}: reading Parquet or Arrow needs "
        "`pip install pyarrow`\n"
    )


def test_unknown_keys_are_refused_before_any_work(tmp_path, sp_model, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": 1, "text": "a", "title": "b"}) + "\n")
    prefix = tmp_path / "out/x"
    common = ["--input", str(corpus), "--output-prefix", str(prefix), *sp_flags(sp_model)]
    assert preprocess_data.main([*common, "--json-keys", "text,title"]) == 2
    assert capsys.readouterr().err == (
        f"preprocess_data.py: error: --json-keys 'text,title' not in {corpus}: its records "
        "have keys id, text, title (separate keys with spaces: --json-keys text title)\n"
    )
    assert preprocess_data.main([*common, "--json-keys", "text", "body"]) == 2
    assert capsys.readouterr().err == (
        f"preprocess_data.py: error: --json-keys 'body' not in {corpus}: its records have "
        "keys id, text, title\n"
    )
    assert not list(prefix.parent.iterdir())  # refused before anything was written

    table = write_parquet(tmp_path / "t.parquet", [{"id": 1, "text": "a"}])
    with pytest.raises(SystemExit, match=r"'body' not in .*t.parquet: its columns are id, text$"):
        run_tool(table, prefix, "--json-keys", "body", *sp_flags(sp_model))
    with pytest.raises(SystemExit, match=r"'id' in .*t.parquet is a column of int64: expected"):
        run_tool(table, prefix, "--json-keys", "id", *sp_flags(sp_model))
    not_parquet = tmp_path / "bad.parquet"
    not_parquet.write_text('{"text": "json, not parquet"}\n')
    with pytest.raises(SystemExit, match=r"--input .*bad.parquet: not a readable Parquet file"):
        run_tool(not_parquet, prefix, *sp_flags(sp_model))


def garbage(path: Path) -> Path:
    """2 MB of random bytes: every line malformed."""
    path.write_bytes(np.random.default_rng(0).bytes(2 << 20))
    return path


def no_rows(path: Path) -> Path:
    """A Parquet file with a text column and no rows."""
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    return path


def nulls(path: Path) -> Path:
    """An Arrow stream whose text column (of strings) holds only nulls."""
    table = pa.table({"text": pa.array([None] * 3, pa.string())})
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.mark.parametrize(
    "make_input, why",
    [
        (lambda d: write_jsonl(d / "empty.jsonl", []), "the input is empty"),
        (lambda d: garbage(d / "garbage.jsonl"), r"all [\d,]+ lines/rows are malformed \(the"),
        (lambda d: no_rows(d / "none.parquet"), "the input is empty"),
        (
            lambda d: nulls(d / "null.arrow"),
            r"all 3 lines/rows .*arrow: row 1: key 'text' is null",
        ),
    ],
    ids=["empty-jsonl", "binary-garbage", "zero-row-parquet", "all-null-arrow"],
)
def test_no_documents_fails_and_keeps_the_earlier_output(tmp_path, sp_model, make_input, why):
    out = tmp_path / "out"
    out.mkdir()
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "Speak, speak."}] * 3)
    first = run_cli("--input", good, "--output-prefix", out / "c", *sp_flags(sp_model))
    assert first.returncode == 0, first.stderr
    before = output_bytes(out / "c")
    source = make_input(tmp_path)
    result = run_cli("--input", source, "--output-prefix", out / "c", *sp_flags(sp_model))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Opening") and len(lines) == 2, result.stderr
    assert lines[1].startswith(f"preprocess_data.py: error: --input {source}: no documents: ")
    assert re.search(why, lines[1]), lines[1]
    # Nothing lost, nothing half-written: the earlier pair, and only it.
    assert output_bytes(out / "c") == before
    assert sorted(p.name for p in out.iterdir()) == ["c_text_document.bin", "c_text_document.idx"]


def test_strict_failure_late_in_the_run_leaves_no_partial_output(tmp_path, records, sp_model):
    rows = [json.dumps({"text": r["text"] or "x"}) for r in records] * 4
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(rows) + "\n{broken\n")  # after a few batches were written
    prefix = tmp_path / "out/late"
    with pytest.raises(SystemExit, match=r"malformed input line \(--strict\): .*late.jsonl:2401:"):
        run_tool(path, prefix, "--strict", "--partitions", 2, *sp_flags(sp_model))
    assert not list(prefix.parent.iterdir())
    result = run_cli("--input", path, "--output-prefix", prefix, "--strict", *sp_flags(sp_model))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"preprocess_data.py: error: malformed input line (--strict): {path}:2401: "
        "invalid JSON (Expecting property name enclosed in double quotes)"
    )


def test_unpaired_surrogates_are_malformed_lines(tmp_path, sp_model):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "a\\ud800b"}\n{"text": "\\ud83d\\ude00 fine"}\n')
    stats = run_tool(path, tmp_path / "s", *sp_flags(sp_model))
    assert stats.documents == 2
    assert stats.examples == [
        f"{path}:2: key 'text' holds an unpaired surrogate (not valid Unicode)"
    ]


def test_a_bad_tokenizer_model_is_one_line_before_the_input_is_read(
    tmp_path, hf_tokenizer_dir, tiktoken_vocab
):
    # The input's key is wrong too: the tokenizer's error must come first.
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"body": "x"}])
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a model\n" * 100)
    broken_hf = tmp_path / "hf"
    broken_hf.mkdir()
    (broken_hf / "tokenizer.json").write_text("{ not json")
    cases = [
        ("Llama2Tokenizer", tmp_path / "missing.model", "no such SentencePiece model file"),
        ("Llama2Tokenizer", junk, "cannot load it as a Llama2Tokenizer: "),
        ("HuggingFaceTokenizer", tmp_path / "nowhere", "expected a tokenizer.json or a dir"),
        ("HuggingFaceTokenizer", broken_hf, "cannot load it as a HuggingFaceTokenizer: "),
        ("TikTokenizer", junk, "expected a TikToken .json vocabulary"),
    ]
    for tokenizer_type, model, reason in cases:
        result = run_cli(
            "--input", corpus, "--output-prefix", tmp_path / "o",
            "--tokenizer-type", tokenizer_type, "--tokenizer-model", model,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"preprocess_data.py: error: --tokenizer-model {model}: ")
        assert reason in result.stderr, result.stderr


CUT_CASES = [
    "a b",
    "word  two   spaces and  more",
    "  leading spaces, trailing ones   ",
    "tabs\tand\nnew lines \n  indented\n\n x y\u3000ideographic space",
    "ünïcödé naïve café — ✓ emoji 😀 and byte fallback \x07 chars",
    " x  y   z    " * 50,
]


def test_cut_pieces_encode_to_the_whole_texts_tokens(sp_model, shakespeare_docs):
    import sentencepiece

    assert long_texts.cuts_keep_the_tokens(sp_model)  # LLaMA-2's model passes the checks
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    texts = [*CUT_CASES, "\n\n".join(shakespeare_docs[:200])]
    for text in texts:
        whole = sp.encode(text)
        for piece_chars in (1, 2, 3, 5, 8, 13, 64, 1000):
            pieces = list(long_texts.text_pieces(text, piece_chars))
            assert " ".join(pieces) == text  # one space dropped at each cut, nothing else
            joined = [i for piece in pieces for i in sp.encode(piece)]
            assert joined == whole, (text[:40], piece_chars, pieces[:4])
    assert len(list(long_texts.text_pieces(texts[-1], 64))) > 300


def test_a_long_document_cut_in_pieces_gives_the_same_bytes(
    tmp_path, sp_model, shakespeare_docs, shakespeare_text, monkeypatch
):
    long = (shakespeare_text * 3)[: 3 << 20]  # 3 MB, newlines, punctuation and runs of spaces
    rows = [{"text": d} for d in shakespeare_docs[:50]] + [{"text": long}, {"text": "end"}]
    corpus = write_jsonl(tmp_path / "long.jsonl", rows)
    flags = ["--append-eod", "--workers", 2, *sp_flags(sp_model)]
    monkeypatch.setattr(preprocess_data, "PIECE_CHARS", 1 << 40)  # never cut
    run_tool(corpus, tmp_path / "whole", *flags)
    monkeypatch.setattr(preprocess_data, "PIECE_CHARS", 4096)  # ~770 pieces
    monkeypatch.setattr(long_texts, "_CHARS_IN_FLIGHT", 64 << 10)  # in groups of 2
    run_tool(corpus, tmp_path / "cut", *flags)
    run_tool(corpus, tmp_path / "cut3", "--partitions", 3, *flags)
    run_tool(corpus, tmp_path / "whole3", "--partitions", 3, *flags)
    assert output_bytes(tmp_path / "cut") == output_bytes(tmp_path / "whole")
    assert output_bytes(tmp_path / "cut3") == output_bytes(tmp_path / "whole3")
    # The cut path did run: the long text comes back as one array of the file's dtype.
    tokenizer = build_tokenizer("Llama2Tokenizer", sp_model)
    ids = long_texts.tokenize_texts(["short", long[:20000]], tokenizer, 2, 4096, np.uint16)
    assert isinstance(ids[0], list) and ids[1].dtype == np.uint16
    assert ids[1].tolist() == tokenizer.tokenize(long[:20000])


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktoken_cuts_keep_the_space_and_the_tokens(
    tmp_path, tiktoken_vocab, shakespeare_docs, shakespeare_text, pattern, monkeypatch
):
    vocab, vocab_size = tiktoken_vocab
    tokenizer = build_tokenizer("TikTokenizer", vocab, vocab_size=vocab_size,
                                tiktoken_pattern=pattern)  # fmt: skip
    rule = long_texts.cut_rule(tokenizer)
    assert rule is long_texts.TIKTOKEN_CUTS
    extra = ["x \n  y\t z 12 345 6789 a.b, c! <s> d</s> e's", "\n \n  \t  end "]
    for text in [*CUT_CASES, *extra, "\n\n".join(shakespeare_docs[:100])]:
        whole = tokenizer.tokenize(text)
        for piece_chars in (1, 2, 3, 5, 8, 13, 64, 1000):
            pieces = list(long_texts.text_pieces(text, piece_chars, rule))
            assert "".join(pieces) == text  # every space kept
            joined = [i for piece in pieces for i in tokenizer.tokenize(piece)]
            assert joined == whole, (pattern, text[:40], piece_chars, pieces[:4])
    # Through the tool: a 1 MB document cut in ~250 pieces gives the whole text's bytes.
    corpus = write_jsonl(tmp_path / "long.jsonl", [{"text": shakespeare_text[: 1 << 20]}])
    flags = ["--append-eod", "--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocab,
             "--vocab-size", vocab_size, "--tiktoken-pattern", pattern]  # fmt: skip
    monkeypatch.setattr(preprocess_data, "PIECE_CHARS", 1 << 40)
    run_tool(corpus, tmp_path / "whole", *flags)
    monkeypatch.setattr(preprocess_data, "PIECE_CHARS", 4096)
    run_tool(corpus, tmp_path / "cut", *flags)
    assert output_bytes(tmp_path / "cut") == output_bytes(tmp_path / "whole")


def test_a_20_mb_document_takes_bounded_memory(tmp_path, sp_model, shakespeare_text):
    corpus = tmp_path / "big.jsonl"
    corpus.write_text(json.dumps({"text": (shakespeare_text * 19)[: 20 << 20]}) + "\n")
    # A fresh parent, so the peak RSS of its children is the tool's alone.
    script = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True, capture_output=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    argv = [sys.executable, TOOL, "--input", corpus, "--output-prefix", tmp_path / "big"]
    argv += ["--workers", "2", *sp_flags(sp_model)]
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    peak_mb = int(result.stdout) / 1024  # ru_maxrss is in KiB on Linux
    # Whole, this text took 1.0 GB; cut, 160 MB (the text, its JSON line and 2 pieces).
    assert peak_mb < 400, peak_mb
    assert IndexedDataset(tmp_path / "big_text_document").num_documents == 1
