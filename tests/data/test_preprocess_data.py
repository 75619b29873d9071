"""tools/preprocess_data.py: byte-identical to Megatron-LM's tool, decodes back to the input,
skips and reports malformed lines, handles compressed input and bad output directories.

The reference output is Megatron-LM's `preprocess_data.py` logic (its `Encoder.encode` and
write loop, restated below in a few lines) running on Megatron-Core's own tokenizer wrapper and
`IndexedDatasetBuilder`; the same check against the real script at core_v0.16.1 is in
docs/data.md.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data.indexed_dataset import IndexedDataset
from tests.paths import REPO
from tools import preprocess_data


def megatron_reference(
    input_path, prefix, keys, library, model, append_eod, partitions=1, **tokenizer_kwargs
):
    """What Megatron-LM's tools/preprocess_data.py writes, built with Megatron-Core itself."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(model), metadata_path={"library": library}, **tokenizer_kwargs
    )
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    lines = Path(input_path).read_text(encoding="utf-8").splitlines(keepends=True)
    for key in keys:
        parts = []
        for p in range(partitions):
            name = f"{prefix}_{p}_{key}_document" if partitions > 1 else f"{prefix}_{key}_document"
            builder = IndexedDatasetBuilder(f"{name}.bin", dtype=dtype)
            for line in lines[p::partitions]:  # Megatron's round-robin split
                text = json.loads(line)[key]
                doc_ids, lens = [], []
                for sentence in text if isinstance(text, list) else [text]:
                    ids = tokenizer.tokenize(sentence)
                    if len(ids) > 0:
                        doc_ids.extend(ids)
                        lens.append(len(ids))
                if len(doc_ids) > 0 and append_eod:
                    doc_ids.append(tokenizer.eod)
                    lens[-1] += 1
                builder.add_document(doc_ids, lens)
            builder.finalize(f"{name}.idx")
            parts.append(name)
        if partitions > 1:
            builder = IndexedDatasetBuilder(f"{prefix}_{key}_document.bin", dtype=dtype)
            for name in parts:
                builder.add_index(name)
            builder.finalize(f"{prefix}_{key}_document.idx")


def sp_flags(model) -> list[str]:
    """The LLaMA-2 SentencePiece tokenizer flags."""
    return ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(model)]


def run_tool(input_path, output_prefix, *flags) -> preprocess_data.Stats:
    """Run the tool in this process on `input_path` (the rest are its other flags)."""
    argv = ["--input", input_path, "--output-prefix", output_prefix, *flags]
    return preprocess_data.preprocess(preprocess_data.get_args([str(a) for a in argv]))


def assert_same_files(ours: str, theirs: str) -> None:
    for suffix in (".bin", ".idx"):
        assert Path(ours + suffix).read_bytes() == Path(theirs + suffix).read_bytes(), suffix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_docs) -> Path:
    """~1,500 Shakespeare paragraphs plus the edge cases Megatron's tool has rules for."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    records = [{"text": doc, "title": doc[:20]} for doc in shakespeare_docs[:1500]]
    records += [
        {"text": "", "title": "empty document"},
        {"text": ["Sentence one.", "", "Sentence three."], "title": "pre-split"},
        {"text": "naïve café — ünïcödé ✓", "title": ""},
    ]
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize(
    "append_eod, partitions, keys",
    [(True, 1, ["text"]), (False, 1, ["text", "title"]), (True, 3, ["text"])],
)
def test_byte_identical_to_megatron_sentencepiece(
    tmp_path, corpus, sp_model, append_eod, partitions, keys
):
    flags = ["--append-eod"] if append_eod else []
    run_tool(
        corpus,
        tmp_path / "out/ours",
        "--json-keys",
        *keys,
        *sp_flags(sp_model),
        "--workers",
        2,
        "--partitions",
        partitions,
        *flags,
    )
    megatron_reference(
        corpus, tmp_path / "ref", keys, "sentencepiece", sp_model, append_eod, partitions
    )
    for key in keys:
        assert_same_files(f"{tmp_path}/out/ours_{key}_document", f"{tmp_path}/ref_{key}_document")
    # Partition pieces are merged and removed, as Megatron leaves only the merged pair.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"ours_{k}_document{s}" for k in keys for s in (".bin", ".idx")
    )


@pytest.mark.parametrize("special_tokens", [True, False])
def test_byte_identical_to_megatron_huggingface(tmp_path, corpus, hf_tokenizer_dir, special_tokens):
    # Megatron-LM adds the tokenizer's special tokens (BOS here) unless
    # --tokenizer-hf-no-include-special-tokens; Megatron-Core's wrapper takes it as an argument.
    flags = [] if special_tokens else ["--tokenizer-hf-no-include-special-tokens"]
    run_tool(
        corpus,
        tmp_path / "ours",
        "--append-eod",
        *flags,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        hf_tokenizer_dir,
    )
    megatron_reference(
        corpus,
        tmp_path / "ref",
        ["text"],
        "huggingface",
        hf_tokenizer_dir,
        True,
        include_special_tokens=special_tokens,
    )
    assert_same_files(f"{tmp_path}/ours_text_document", f"{tmp_path}/ref_text_document")
    first = IndexedDataset(tmp_path / "ours_text_document")[0]
    assert (first[0] == 0) == special_tokens  # <s> is id 0 in the fixture tokenizer


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_byte_identical_to_megatron_tiktoken(tmp_path, corpus, tiktoken_vocab, pattern):
    vocab, vocab_size = tiktoken_vocab
    flags = ["--tiktoken-pattern", pattern, "--vocab-size", vocab_size]
    run_tool(
        corpus,
        tmp_path / "ours",
        "--append-eod",
        "--tokenizer-type",
        "TikTokenizer",
        "--tokenizer-model",
        vocab,
        *flags,
    )
    megatron_reference(
        corpus,
        tmp_path / "ref",
        ["text"],
        "tiktoken",
        vocab,
        True,
        pattern=pattern,
        vocab_size=vocab_size,
    )
    assert_same_files(f"{tmp_path}/ours_text_document", f"{tmp_path}/ref_text_document")
    ds = IndexedDataset(tmp_path / "ours_text_document")
    assert ds.dtype == np.uint16 and int(ds[0][-1]) == 2  # </s> is the EOD


def test_decodes_back_to_the_text(tmp_path, corpus, sp_model):
    import sentencepiece

    run_tool(
        corpus,
        tmp_path / "ours",
        "--append-eod",
        *sp_flags(sp_model),
    )
    ds = IndexedDataset(tmp_path / "ours_text_document", verify_pointers=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert ds.num_documents == len(records) and ds.dtype == np.uint16
    for d, record in enumerate(records):
        tokens = ds.document(d).tolist()
        text = record["text"]
        if text == "":
            assert tokens == []  # an empty document keeps its entry and gets no EOD
            continue
        assert tokens[-1] == sp.eos_id()
        if isinstance(text, str):
            assert sp.decode(tokens[:-1]) == text
        else:  # pre-split: one sequence per non-empty sentence, EOD on the last
            first, last = ds.document_indices[d], ds.document_indices[d + 1]
            decoded = [sp.decode(ds[int(i)].tolist()) for i in range(first, last)]
            assert decoded == [s for s in text if s]  # decode drops the EOD control token


def test_malformed_lines_are_counted_reported_and_skipped(tmp_path, sp_model, capsys):
    good = [json.dumps({"text": f"line {i}"}) for i in range(5)]
    lines = [
        good[0],
        "{not json",
        good[1],
        json.dumps({"body": "x"}),
        json.dumps({"text": 3}),
        "",
        good[2],
        json.dumps(["text"]),
        good[3],
        good[4],
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(good) + "\n")
    common = sp_flags(sp_model)
    preprocess_data.main(["--input", str(path), "--output-prefix", str(tmp_path / "a"), *common])
    err = capsys.readouterr().err
    assert "Skipped 5 malformed lines" in err
    for line_number, why in [
        (2, "invalid JSON"),
        (4, "missing key 'text'"),
        (5, "key 'text' is int"),
        (6, "empty line"),
        (8, "expected a JSON object"),
    ]:
        assert f"{path}:{line_number}: {why}" in err
    run_tool(clean, tmp_path / "b", *common)
    assert_same_files(f"{tmp_path}/a_text_document", f"{tmp_path}/b_text_document")

    with pytest.raises(SystemExit, match=rf"--strict.*{path.name}:2: invalid JSON"):
        run_tool(path, tmp_path / "c", "--strict", *common)
    assert not list(tmp_path.glob("c_*"))  # nothing half-written is left behind


def test_compressed_inputs_give_the_same_bytes(tmp_path, corpus, sp_model):
    zstandard = pytest.importorskip("zstandard", reason="zstandard is in the [test] extra")
    raw = corpus.read_bytes()
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    common = sp_flags(sp_model)
    for name in ("plain", "gz", "zst"):
        source = corpus if name == "plain" else tmp_path / f"in.jsonl.{name}"
        run_tool(source, tmp_path / name, *common)
    assert_same_files(f"{tmp_path}/gz_text_document", f"{tmp_path}/plain_text_document")
    assert_same_files(f"{tmp_path}/zst_text_document", f"{tmp_path}/plain_text_document")


def test_output_directory_created_and_unwritable_one_rejected_first(tmp_path, corpus, sp_model):
    common = sp_flags(sp_model)
    run_tool(corpus, tmp_path / "new/deeper/out", *common)
    assert IndexedDataset.exists(tmp_path / "new/deeper/out_text_document")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    # A regular file where a directory should be is unwritable even for root.
    with pytest.raises(SystemExit, match=r"--output-prefix .*a_file/out: cannot write"):
        run_tool(corpus, blocker / "out", *common)
    with pytest.raises(SystemExit, match=r"--input .*missing.jsonl: no such file"):
        run_tool(tmp_path / "missing.jsonl", tmp_path / "x", *common)


def test_command_line_prints_progress_and_summary(tmp_path, corpus, sp_model):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/preprocess_data.py"),
            "--input",
            str(corpus),
            "--output-prefix",
            str(tmp_path / "cli"),
            "--tokenizer-type",
            "Llama2Tokenizer",
            "--tokenizer-model",
            str(sp_model),
            "--workers",
            "1",
            "--log-interval",
            "500",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "docs/s" in result.stderr and "tokens/s" in result.stderr and "MB/s" in result.stderr
    assert "Done: 1,503 documents" in result.stderr


def test_memory_does_not_grow_with_the_corpus(tmp_path, sp_model):
    """Peak Python memory for 10x the documents stays within a small margin of 1x."""
    import tracemalloc

    def peak_bytes(num_docs: int) -> int:
        path = tmp_path / f"in{num_docs}.jsonl"
        line = json.dumps({"text": "Speak, speak. We are accounted poor citizens."}) + "\n"
        path.write_text(line * num_docs)
        tracemalloc.start()
        run_tool(
            path,
            tmp_path / f"out{num_docs}",
            *sp_flags(sp_model),
        )
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = peak_bytes(3_000), peak_bytes(30_000)
    assert large < 1.2 * small, (small, large)
