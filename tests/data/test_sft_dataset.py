"""SFT: the loss mask covers exactly the assistant tokens, packed documents never see each
other, and the preprocessed (indexed) form gives the same samples as the JSONL; the
preprocess mode with the tokenizer's own Jinja template (`auto`), a template file and a
built-in (the Jinja rendering itself is checked against transformers in test_chat_template)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.data.indexed_dataset import IndexedDataset
from engine.data.sft_dataset import (
    TEMPLATES,
    SFTDataset,
    chat_template_of,
    messages_of,
    preprocess_sft,
    render,
)
from engine.data.tokenizer import build_tokenizer
from tests.paths import REPO

CONVERSATIONS = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Crimson, naturally."},
        ]
    },
    {"prompt": "What is 2 + 2?", "response": "4"},
] + [
    {"prompt": f"Say the number {i} in words.", "response": f"It is number {i}, of course."}
    for i in range(30)
]


@pytest.fixture(scope="module")
def tokenizer(sp_model):
    return build_tokenizer("Llama2Tokenizer", sp_model)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in CONVERSATIONS) + "\n")
    return path


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer, template):
    messages = CONVERSATIONS[0]["messages"]
    ids, mask = render(messages, tokenizer, TEMPLATES[template])
    # Split into maximal runs of equal mask: the masked runs are the assistant replies + EOS.
    edges = np.flatnonzero(np.diff(mask)) + 1
    runs = np.split(np.arange(len(ids)), edges)
    learned = [r for r in runs if mask[r[0]] == 1]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(learned) == len(replies)
    for run, reply in zip(learned, replies, strict=True):
        assert ids[run[-1]] == tokenizer.eod
        assert tokenizer.detokenize(ids[run[:-1]]) == reply
    prompt_text = tokenizer.detokenize(ids[mask == 0])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in prompt_text
        else:
            assert m["content"] not in prompt_text
    if template == "llama2":
        assert "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nName a colour. [/INST]" in prompt_text


def test_prompt_response_equals_two_messages(tokenizer):
    pair = render(
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
        tokenizer,
        TEMPLATES["llama2"],
    )
    other = render(messages_of(CONVERSATIONS[1]), tokenizer, TEMPLATES["llama2"])
    assert all(np.array_equal(a, b) for a, b in zip(pair, other, strict=True))


def reference_attention(document_ids: np.ndarray) -> np.ndarray:
    """Masked (True) unless same document and not in the future; padding sees itself."""
    seq = len(document_ids)
    masked = np.ones((seq, seq), bool)
    for i in range(seq):
        for j in range(i + 1):
            if document_ids[i] == document_ids[j] >= 0 or i == j:
                masked[i, j] = False
    return masked


def test_packing_keeps_documents_apart(tokenizer, jsonl):
    ds = SFTDataset.from_jsonl(jsonl, tokenizer, seq_length=64, seed=3)
    lengths = ds.documents.sequence_lengths
    packed = sorted(int(d) for row in ds.rows for d in row)
    assert packed == list(range(len(CONVERSATIONS)))  # every conversation exactly once
    assert len(ds) < len(CONVERSATIONS)  # and several share rows
    for i in range(len(ds)):
        sample = ds[i]
        docs = sample["document_ids"].numpy()
        assert torch.equal(sample["attention_mask"][0], torch.from_numpy(reference_attention(docs)))
        row = ds.rows[i]
        at = 0
        for n, doc in enumerate(row.tolist()):
            size = min(int(lengths[doc]), 64)
            ids = ds.documents.tokens(doc)[:size]
            mask = ds.documents.mask(doc)[:size]
            span = slice(at, at + size)
            assert (docs[span] == n).all()
            np.testing.assert_array_equal(sample["tokens"][span].numpy(), ids)
            np.testing.assert_array_equal(sample["position_ids"][span].numpy(), np.arange(size))
            # Labels are the next token of the same document; its last token learns nothing.
            np.testing.assert_array_equal(sample["labels"][at : at + size - 1].numpy(), ids[1:])
            np.testing.assert_array_equal(sample["loss_mask"][at : at + size - 1].numpy(), mask[1:])
            assert sample["loss_mask"][at + size - 1] == 0
            at += size
        assert (docs[at:] == -1).all() and (sample["loss_mask"][at:] == 0).all()
        starts = sample["cu_seqlens"].tolist()
        assert starts[0] == 0 and starts[-1] == 64 and len(starts) == len(row) + 1 + (at < 64)


def test_long_conversations_are_truncated_to_a_row(tokenizer, jsonl):
    ds = SFTDataset.from_jsonl(jsonl, tokenizer, seq_length=12)
    assert ds.truncated > 0
    assert all(ds[i]["tokens"].shape == (12,) for i in range(len(ds)))


def test_preprocessed_form_gives_the_same_samples(tmp_path, tokenizer, jsonl):
    count = preprocess_sft(jsonl, str(tmp_path / "out/chat"), tokenizer, "llama2")
    assert count == len(CONVERSATIONS)
    from_json = SFTDataset.from_jsonl(jsonl, tokenizer, seq_length=64, seed=5)
    from_idx = SFTDataset.from_indexed(str(tmp_path / "out/chat"), seq_length=64, seed=5)
    assert len(from_json) == len(from_idx)
    for i in range(len(from_json)):
        a, b = from_json[i], from_idx[i]
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_bad_records_name_the_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(CONVERSATIONS[1]) + "\n" + json.dumps({"prompt": "no answer"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a 'messages' list"):
        SFTDataset.from_jsonl(path, tokenizer, seq_length=32)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*no assistant message"):
        SFTDataset.from_jsonl(path, tokenizer, seq_length=32)
    with pytest.raises(ValueError, match="--chat-template 'chatml'"):
        SFTDataset.from_jsonl(path, tokenizer, seq_length=32, template="chatml")


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """The ChatML tokenizer of test_chat_template.py, its template with generation blocks."""
    pytest.importorskip("transformers", reason="transformers is a test extra")
    from tests.data.test_chat_template import build_chat_tokenizer

    return build_chat_tokenizer(tmp_path_factory.mktemp("chatml"), "chatml_generation")


def preprocess_cli(tmp_path, jsonl, tokenizer_dir, template: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.data.sft_dataset", "--input", str(jsonl),
         "--output-prefix", str(tmp_path / "out/chat"), "--tokenizer-type",
         "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir),
         "--chat-template", template],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["auto", "file", "builtin"])
def test_preprocess_cli_with_each_kind_of_template(tmp_path, jsonl, chat_tokenizer_dir, kind):
    """`python -m engine.data.sft_dataset --chat-template auto | FILE | NAME` writes the
    rendering's tokens and masks; with auto they are transformers' ids and assistant mask."""
    import transformers

    from tests.data.test_chat_template import LLAMA3

    template = {"auto": "auto", "file": str(tmp_path / "llama3.jinja"), "builtin": "plain"}[kind]
    if kind == "file":
        (tmp_path / "llama3.jinja").write_text(LLAMA3.replace("bos_token + ", ""))
    result = preprocess_cli(tmp_path, jsonl, chat_tokenizer_dir, template)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = IndexedDataset(str(tmp_path / "out/chat_tokens_document"))
    masks = IndexedDataset(str(tmp_path / "out/chat_loss_mask_document"))
    assert len(tokens) == len(masks) == len(CONVERSATIONS)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", chat_tokenizer_dir)
    chat = chat_template_of(template, chat_tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    for i, record in enumerate(CONVERSATIONS):
        messages = messages_of(record)
        ids, mask = render(messages, tokenizer, chat)
        np.testing.assert_array_equal(tokens[i], ids)
        np.testing.assert_array_equal(masks[i], mask)
        if kind == "auto":
            expected = hf.apply_chat_template(
                messages, return_dict=True, return_assistant_tokens_mask=True
            )
            assert tokens[i].tolist() == expected["input_ids"]
            assert masks[i].tolist() == expected["assistant_masks"]
        if kind == "file":
            assert tokenizer.detokenize(tokens[i]).startswith("<|start_header_id|>")


def test_packing_with_the_tokenizers_template(tmp_path, jsonl, chat_tokenizer_dir):
    """Packing is the same with a Jinja template: JSONL in memory equals the preprocessed form,
    and each packed document is the rendering with its mask shifted onto the labels."""
    tokenizer = build_tokenizer("HuggingFaceTokenizer", chat_tokenizer_dir)
    count = preprocess_sft(jsonl, str(tmp_path / "out/chat"), tokenizer, "auto")
    assert count == len(CONVERSATIONS)
    from_json = SFTDataset.from_jsonl(jsonl, tokenizer, seq_length=256, template="auto", seed=5)
    from_idx = SFTDataset.from_indexed(
        str(tmp_path / "out/chat"), seq_length=256, seed=5, pad=tokenizer.pad
    )
    assert len(from_json) == len(from_idx) < len(CONVERSATIONS)
    for i in range(len(from_json)):
        a, b = from_json[i], from_idx[i]
        for key in a:
            assert torch.equal(a[key], b[key]), key
    chat = chat_template_of("auto", chat_tokenizer_dir)
    doc = int(from_json.rows[0][0])
    ids, mask = render(messages_of(CONVERSATIONS[doc]), tokenizer, chat)
    sample = from_json[0]
    np.testing.assert_array_equal(sample["tokens"][: len(ids)].numpy(), ids)
    np.testing.assert_array_equal(sample["loss_mask"][: len(ids) - 1].numpy(), mask[1:])


def test_preprocess_cli_refuses_a_missing_template_before_the_tokenizer(tmp_path, jsonl):
    missing = tmp_path / "missing.jinja"
    result = preprocess_cli(tmp_path, jsonl, tmp_path / "no-tokenizer", str(missing))
    assert result.returncode == 2
    assert f"--chat-template '{missing}': no such file" in result.stderr
    assert not (tmp_path / "out").exists()
