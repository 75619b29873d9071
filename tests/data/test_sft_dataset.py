"""SFT: the loss mask covers exactly the assistant tokens, packed documents never see each
other, and the preprocessed (indexed) form gives the same samples as the JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.data.sft_dataset import TEMPLATES, SFTDataset, preprocess_sft, render
from engine.data.tokenizer import build_tokenizer

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
    from engine.data.sft_dataset import messages_of

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
