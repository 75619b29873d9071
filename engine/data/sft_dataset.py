"""Instruction-tuning data: chat rendering, assistant-only loss, and sequence packing.

Input is JSONL with either `{"messages": [{"role": ..., "content": ...}, ...]}` (roles
`system`, `user`, `assistant`) or `{"prompt": ..., "response": ...}` (one user turn, one
assistant turn). `--chat-template` (`chat_template_of`) is one of three kinds:

- a built-in name (`TEMPLATES`): a `ChatTemplate` renders a conversation piece by piece,
  tokenizing each piece on its own, so every token is known to come from the prompt side
  (loss 0) or from an assistant reply (loss 1, including the EOS that ends it);
- `auto`: the Jinja template shipped with the tokenizer (beside `--tokenizer-model`);
- a path to a Jinja template file.

A Jinja template renders the whole conversation, which is tokenized at once (the ids
transformers' `apply_chat_template` gives); the loss mask is 1 on the tokens of the
assistant's text, found from the rendering (`engine.data.chat_template`: generation blocks,
or turn by turn with the end-of-turn text included).

Packing: conversations (shuffled with `seed`) are laid greedily into rows of `seq_length`
tokens; one that does not fit starts a new row, one longer than a row is truncated. Inside a
row every conversation keeps its own position ids (from 0) and document id; labels never
cross a document end; `attention_mask` (`[1, seq, seq]`, True = masked) is causal within a
document and blocks everything across documents, and `cu_seqlens` gives the same boundaries
to variable-length attention kernels.

Preprocess mode (`python -m engine.data.sft_dataset --input ... --output-prefix ...
--chat-template ...`) writes
`{prefix}_tokens_document` and `{prefix}_loss_mask_document` indexed datasets (the mask as
uint8, one sequence per conversation, aligned with the tokens); `SFTDataset.from_indexed`
reads them back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import torch

from engine.data.chat_template import AUTO, JinjaChatTemplate, encode_chat, load_chat_template
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from engine.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """Text around each turn; `{content}` marks where the message goes.

    The first user turn absorbs the system message through `system`, as LLaMA-2 does.
    Assistant text is tokenized separately and followed by EOS; `bos_per_turn` puts BOS before
    every user turn (LLaMA-2) instead of once at the start.
    """

    name: str
    system: str
    user: str
    assistant_prefix: str
    bos_per_turn: bool


TEMPLATES = {
    "llama2": ChatTemplate(
        name="llama2",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        user="[INST] {system}{content} [/INST]",
        assistant_prefix="",
        bos_per_turn=True,
    ),
    "plain": ChatTemplate(
        name="plain",
        system="{content}\n\n",
        user="{system}User: {content}\nAssistant:",
        assistant_prefix="",
        bos_per_turn=False,
    ),
}


def chat_template_of(
    spec: str, tokenizer_model: str | os.PathLike | None
) -> ChatTemplate | JinjaChatTemplate:
    """The template ``--chat-template`` `spec` names: a built-in (`TEMPLATES`), ``auto`` (the
    Jinja template beside ``--tokenizer-model``) or a Jinja file; ValueError naming the flag
    when there is none. Cheap: reads a file or two, no tokenizer."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if spec != AUTO and not Path(spec).is_file():
        raise ValueError(
            f"--chat-template {spec!r}: no such file (give auto, a .jinja file, or a built-in "
            f"template: {', '.join(sorted(TEMPLATES))})"
        )
    return load_chat_template(spec, tokenizer_model)


def messages_of(record: dict) -> list[dict]:
    """The conversation of one JSONL record (either accepted shape), validated."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    else:
        raise ValueError("expected a 'messages' list or 'prompt' and 'response' strings")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"each message needs a role in {ROLES}, got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message content must be a string, got {m.get('content')!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message to learn from")
    return messages


def render(
    messages: list[dict], tokenizer: Tokenizer, template: ChatTemplate | JinjaChatTemplate
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[n]`` and loss mask ``[n]`` (1 on the assistant's tokens: each reply and
    the EOS or end-of-turn text after it) of one conversation."""
    if isinstance(template, JinjaChatTemplate):
        return encode_chat(template, messages, tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    system = ""
    if tokenizer.bos is not None and not template.bos_per_turn:
        ids.append(tokenizer.bos)
        mask.append(0)
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system = template.system.format(content=content)
            continue
        if role == "user":
            text = template.user.format(system=system, content=content)
            system = ""
            piece = tokenizer.tokenize(text)
            if template.bos_per_turn and tokenizer.bos is not None:
                piece = [tokenizer.bos, *piece]
            ids.extend(piece)
            mask.extend([0] * len(piece))
        else:
            piece = tokenizer.tokenize(template.assistant_prefix + content) + [tokenizer.eod]
            ids.extend(piece)
            mask.extend([1] * len(piece))
    return np.asarray(ids, np.int64), np.asarray(mask, np.uint8)


def render_all(
    path: str | os.PathLike, tokenizer: Tokenizer, template: ChatTemplate | JinjaChatTemplate
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`render` of each conversation in a JSONL file, in order; a template that raises on one
    (a Jinja ``raise_exception``) names the file and the conversation."""
    for number, messages in enumerate(read_conversations(path), start=1):
        try:
            yield render(messages, tokenizer, template)
        except (jinja2.TemplateError, ValueError) as error:
            raise ValueError(f"{path}: conversation {number}: {error}") from None


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Every conversation in a JSONL file; a bad line raises naming the file and line."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                conversations.append(messages_of(json.loads(line)))
            except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    return conversations


class _Documents:
    """Tokens and masks of tokenized conversations, held in memory (flat + offsets)."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]]):
        lengths = np.array([len(t) for t, _ in pairs], np.int64)
        self.sequence_lengths = lengths
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._tokens = np.concatenate([t for t, _ in pairs]) if pairs else np.zeros(0, np.int64)
        self._masks = np.concatenate([m for _, m in pairs]) if pairs else np.zeros(0, np.uint8)

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[self._offsets[i] : self._offsets[i + 1]]

    def mask(self, i: int) -> np.ndarray:
        return self._masks[self._offsets[i] : self._offsets[i + 1]]


class _IndexedDocuments:
    """The same interface over a preprocessed tokens/loss-mask pair of indexed datasets."""

    def __init__(self, prefix: str):
        self._tokens = IndexedDataset(f"{prefix}_tokens_document")
        self._masks = IndexedDataset(f"{prefix}_loss_mask_document")
        if not np.array_equal(self._tokens.sequence_lengths, self._masks.sequence_lengths):
            raise ValueError(f"{prefix}: tokens and loss_mask datasets have different lengths")
        self.sequence_lengths = np.asarray(self._tokens.sequence_lengths, np.int64)

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[i]

    def mask(self, i: int) -> np.ndarray:
        return self._masks[i]


def pack(lengths: np.ndarray, seq_length: int, order: np.ndarray) -> list[np.ndarray]:
    """Greedy packing: documents in `order`, each row holds whole documents up to seq_length.

    A document longer than a row gets a row of its own (and is truncated when read).
    """
    rows: list[np.ndarray] = []
    current: list[int] = []
    used = 0
    for doc in order.tolist():
        size = min(int(lengths[doc]), seq_length)
        if current and used + size > seq_length:
            rows.append(np.asarray(current, np.int64))
            current, used = [], 0
        current.append(doc)
        used += size
    if current:
        rows.append(np.asarray(current, np.int64))
    return rows


class SFTDataset(torch.utils.data.Dataset):
    """Packed instruction-tuning samples of `seq_length` tokens.

    Each sample: `tokens`, `labels`, `loss_mask`, `position_ids`, `document_ids` (-1 on
    padding) of shape `[seq]`; `attention_mask` `[1, seq, seq]` (True = masked); and
    `cu_seqlens` `[documents + 2]` int32 (document starts, the padding start, and seq).
    """

    def __init__(self, documents, seq_length: int, seed: int = 1234, pad: int = 0):
        if seq_length < 2:
            raise ValueError(f"--seq-length must be at least 2 for SFT packing, got {seq_length}")
        self.documents = documents
        self.seq_length = seq_length
        self.pad = pad
        lengths = documents.sequence_lengths
        order = np.random.RandomState(seed).permutation(len(lengths))
        self.rows = pack(lengths, seq_length, order)
        self.truncated = int((lengths > seq_length).sum())

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike,
        tokenizer: Tokenizer,
        seq_length: int,
        template: str | ChatTemplate | JinjaChatTemplate = "llama2",
        seed: int = 1234,
    ) -> SFTDataset:
        """Tokenize a JSONL file in memory and pack it (`template`: a ``--chat-template``
        value, ``auto`` read beside the tokenizer's files, or a loaded template)."""
        pairs = list(render_all(path, tokenizer, _resolve(template, tokenizer)))
        return cls(_Documents(pairs), seq_length, seed, pad=tokenizer.pad or 0)

    @classmethod
    def from_indexed(cls, prefix: str, seq_length: int, seed: int = 1234, pad: int = 0):
        """Pack a dataset written by `preprocess_sft`."""
        return cls(_IndexedDocuments(prefix), seq_length, seed, pad)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        seq = self.seq_length
        tokens = np.full(seq, self.pad, np.int64)
        labels = np.zeros(seq, np.int64)
        loss_mask = np.zeros(seq, np.float32)
        positions = np.zeros(seq, np.int64)
        document_ids = np.full(seq, -1, np.int64)
        starts = [0]
        at = 0
        for n, doc in enumerate(self.rows[idx].tolist()):
            ids = self.documents.tokens(doc)[:seq]
            mask = self.documents.mask(doc)[:seq]
            end = at + len(ids)
            tokens[at:end] = ids
            # Labels stay inside the document: its last token predicts nothing.
            labels[at : end - 1] = ids[1:]
            loss_mask[at : end - 1] = mask[1:]
            positions[at:end] = np.arange(len(ids))
            document_ids[at:end] = n
            at = end
            starts.append(at)
        if at < seq:
            starts.append(seq)  # the padding is its own segment for varlen kernels
        same_doc = document_ids[:, None] == document_ids[None, :]
        causal = np.tri(seq, dtype=bool)
        allowed = causal & same_doc & (document_ids[:, None] >= 0)
        allowed |= np.eye(seq, dtype=bool)  # padding attends to itself: no all-masked rows
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(positions),
            "document_ids": torch.from_numpy(document_ids),
            "attention_mask": torch.from_numpy(~allowed).unsqueeze(0),
            "cu_seqlens": torch.tensor(starts, dtype=torch.int32),
        }


def _resolve(
    template: str | ChatTemplate | JinjaChatTemplate, tokenizer: Tokenizer
) -> ChatTemplate | JinjaChatTemplate:
    if isinstance(template, str):
        return chat_template_of(template, tokenizer.path)
    return template


def preprocess_sft(
    input_path: str | os.PathLike,
    output_prefix: str,
    tokenizer: Tokenizer,
    template: str | ChatTemplate | JinjaChatTemplate,
) -> int:
    """Write `{prefix}_tokens_document` and `{prefix}_loss_mask_document`; return the count."""
    chat = _resolve(template, tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tokens = IndexedDatasetBuilder(
        f"{output_prefix}_tokens_document.bin", optimal_dtype(tokenizer.vocab_size)
    )
    masks = IndexedDatasetBuilder(f"{output_prefix}_loss_mask_document.bin", np.uint8)
    count = 0
    for ids, mask in render_all(input_path, tokenizer, chat):
        tokens.add_document(ids)
        masks.add_document(mask)
        count += 1
    tokens.finalize(f"{output_prefix}_tokens_document.idx")
    masks.finalize(f"{output_prefix}_loss_mask_document.idx")
    return count


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.data.sft_dataset`: the preprocess mode."""
    parser = argparse.ArgumentParser(description="SFT JSONL -> tokens + loss-mask datasets")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument(
        "--chat-template",
        default="llama2",
        help=f"auto (the tokenizer's Jinja template), a .jinja file, or {', '.join(TEMPLATES)}",
    )
    args = parser.parse_args(argv)
    try:  # before the tokenizer is loaded: a wrong flag fails at once
        template = chat_template_of(args.chat_template, args.tokenizer_model)
    except ValueError as error:
        parser.error(str(error))
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    count = preprocess_sft(args.input, args.output_prefix, tokenizer, template)
    print(
        f"wrote {count} conversations to {args.output_prefix}_{{tokens,loss_mask}}_document",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
