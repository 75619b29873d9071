"""Tokenizers with Megatron's interface: vocab_size, eod, bos, pad, tokenize, detokenize.

Three families, chosen by `--tokenizer-type` as in Megatron-LM:

- SentencePiece (`SentencePieceTokenizer`, `GPTSentencePieceTokenizer`, `Llama2Tokenizer`): a
  `.model` file such as LLaMA-2's. `tokenize` adds no BOS/EOS (Megatron's default for
  documents); `eod` is the model's EOS id.
- HuggingFace (`HuggingFaceTokenizer`): a `tokenizer.json`, or a directory holding one (and
  optionally `tokenizer_config.json`, which names the EOS/BOS/PAD tokens). As Megatron-LM's
  wrapper does by default (since it dropped the opposite default of Megatron-Core 0.16),
  `tokenize` applies the tokenizer's post-processor, so LLaMA-style ones add BOS;
  `add_special_tokens=False` (`--tokenizer-hf-no-include-special-tokens`) leaves it out.
- TikToken (`TikTokenizer`, needs the `tiktoken` package): Megatron's JSON vocabulary (a list
  of `{"rank", "token_bytes" (base64), "token_str"}`), its ids shifted up by
  `num_special_tokens` (default 1000) that start with `<unk> <s> </s> <mask> <pad> <cls> <sep>`
  and are padded with `<SPECIAL_i>`; `vocab_size` (default 2**17) includes them; `eod` is
  `</s>` (2); special-token text in documents encodes to its id, as Megatron's does.

`tokenize_batch` encodes many texts with the library's own multi-threaded batch encoder; the
preprocessing tool uses it to stay close to the tokenizer's raw speed. `tokenize_with_offsets`
encodes a text exactly as written (no BOS/EOS added around it, special-token text inside it
encoded to its id) with each token's character span: what a rendered chat template needs
(`engine.data.chat_template`).
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
HUGGINGFACE_TYPES = ("HuggingFaceTokenizer",)
TIKTOKEN_TYPES = ("TikTokenizer",)
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + HUGGINGFACE_TYPES + TIKTOKEN_TYPES


class Tokenizer(ABC):
    """Text <-> token ids."""

    path: str
    """The ``--tokenizer-model`` it was read from: a file, or a directory holding its files."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (unpadded)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id appended by `--append-eod`."""

    @property
    @abstractmethod
    def bos(self) -> int | None:
        """Beginning-of-sequence id, if the vocabulary has one."""

    @property
    @abstractmethod
    def pad(self) -> int | None:
        """Padding id, if the vocabulary has one."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of one text."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of token ids."""

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """`tokenize` of each text; subclasses use the library's threaded batch encoder."""
        return [self.tokenize(text) for text in texts]

    @abstractmethod
    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` as written, and each token's character span ``[start, end)``.

        Nothing is added around the text (a chat template writes its own BOS), and the text of
        a special token inside it (``<|im_end|>``, ``</s>``) encodes to that token's id.
        """


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` (LLaMA-2 style: BOS 1 and EOS 2, added by the caller)."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer-model {path}: no such SentencePiece model file")
        self.path = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self._controls: dict[str, int] | None = None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def pad(self) -> int | None:
        return _optional_id(self._sp.pad_id())

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # SentencePiece encodes a list on its own C++ threads without the GIL.
        return self._sp.encode(list(texts), num_threads=num_threads)

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # SentencePiece never makes a control piece (<s>, </s>) from text, so their text is
        # split off first and each stretch between is encoded on its own (as HF's Llama
        # tokenizers do with special tokens).
        if self._controls is None:
            self._controls = {
                self._sp.id_to_piece(i): i
                for i in range(self._sp.get_piece_size())
                if self._sp.is_control(i)
            }
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, end, special in _split_on_special(text, self._controls):
            if special is not None:
                ids.append(special)
                offsets.append((start, end))
                continue
            for token_id, begin, finish in self._encode_spans(text[start:end]):
                ids.append(token_id)
                offsets.append((start + begin, start + finish))
        return ids, offsets

    def _encode_spans(self, text: str) -> list[tuple[int, int, int]]:
        """``(id, start, end)`` of each piece of `text`, in characters."""
        encode: Any = self._sp.encode  # the two versions' signatures differ
        try:
            proto = encode(text, return_type="proto")
        except TypeError:  # sentencepiece before 0.2.1 calls it out_type="immutable_proto"
            proto = encode(text, out_type="immutable_proto")
        # The proto's spans count UTF-8 bytes: map each byte to the character it belongs to.
        char_of_byte = [i for i, c in enumerate(text) for _ in c.encode("utf-8")]
        char_of_byte.append(len(text))
        return [(p.id, char_of_byte[p.begin], char_of_byte[p.end]) for p in proto.pieces]

    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self) -> dict:
        return {"model_path": self.path}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["model_path"])


class HuggingFaceTokenizer(Tokenizer):
    """A HuggingFace `tokenizers` tokenizer from a `tokenizer.json` or a directory with one."""

    def __init__(self, path: str | os.PathLike, add_special_tokens: bool = True):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"--tokenizer-model {path}: expected a tokenizer.json or a directory holding one"
            )
        self.path = str(path)
        self.add_special_tokens = add_special_tokens
        self._tok = _HFTokenizer.from_file(str(file))
        config = read_json(file.parent / "tokenizer_config.json")
        self._special = {
            role: token_text(config.get(f"{role}_token")) for role in ("eos", "bos", "pad")
        }

    def _special_id(self, role: str) -> int | None:
        text = self._special[role]
        if text is None:
            return None
        return self._tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        # Megatron's HF wrapper uses len(tokenizer): the vocabulary plus added tokens.
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        eos = self._special_id("eos")
        if eos is None:
            for candidate in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"):
                eos = self._tok.token_to_id(candidate)
                if eos is not None:
                    break
        if eos is None:
            raise ValueError(
                f"{self.path}: no end-of-document token: add eos_token to tokenizer_config.json"
            )
        return eos

    @property
    def bos(self) -> int | None:
        return self._special_id("bos")

    @property
    def pad(self) -> int | None:
        return self._special_id("pad")

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # encode_batch parallelises in Rust (RAYON_NUM_THREADS caps it) without the GIL.
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # What transformers' apply_chat_template encodes a rendered chat with.
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [(start, end) for start, end in encoding.offsets]

    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self) -> dict:
        return {"path": self.path, "add_special_tokens": self.add_special_tokens}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, **state)


class TikTokenizer(Tokenizer):
    """Megatron's TikToken tokenizer: a JSON BPE vocabulary behind a block of special ids."""

    SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
    # The pre-tokenizer splits of Megatron's `--tiktoken-pattern v1|v2`; part of the format,
    # since they decide which merges can happen.
    PATTERNS = {
        "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
        "v2": (
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
            r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    }

    def __init__(
        self,
        vocab_path: str | os.PathLike,
        pattern: str = "v2",
        vocab_size: int = 2**17,
        num_special_tokens: int = 1000,
    ):
        try:
            import tiktoken
        except ImportError as error:
            raise ImportError(
                "--tokenizer-type TikTokenizer needs `pip install tiktoken`"
            ) from error
        path = Path(vocab_path)
        if not path.is_file() or path.suffix != ".json":
            raise FileNotFoundError(
                f"--tokenizer-model {path}: expected a TikToken .json vocabulary"
            )
        if pattern not in self.PATTERNS:
            raise ValueError(f"--tiktoken-pattern {pattern!r}: use one of {sorted(self.PATTERNS)}")
        if not len(self.SPECIAL_TOKENS) <= num_special_tokens < vocab_size:
            raise ValueError(
                f"--tiktoken-num-special-tokens {num_special_tokens} must be at least "
                f"{len(self.SPECIAL_TOKENS)} and below --vocab-size {vocab_size}"
            )
        self.path, self.pattern = str(path), pattern
        self._vocab_size, self.num_special_tokens = vocab_size, num_special_tokens
        ranks = _load_tiktoken_ranks(path, vocab_size - num_special_tokens, num_special_tokens)
        specials = list(self.SPECIAL_TOKENS)
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        self._encoding = tiktoken.Encoding(
            name=path.stem,
            pat_str=self.PATTERNS[pattern],
            mergeable_ranks=ranks,
            special_tokens={token: i for i, token in enumerate(specials)},
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self.SPECIAL_TOKENS.index("</s>")

    @property
    def bos(self) -> int | None:
        return self.SPECIAL_TOKENS.index("<s>")

    @property
    def pad(self) -> int | None:
        return self.SPECIAL_TOKENS.index("<pad>")

    def tokenize(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # tiktoken's batch encoder runs its Rust core on a thread pool without the GIL.
        return self._encoding.encode_batch(
            list(texts), num_threads=num_threads, allowed_special="all"
        )

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.tokenize(text)
        # Byte-level BPE decodes back to the text; each token starts where its first byte is.
        _, starts = self._encoding.decode_with_offsets(ids)
        return ids, list(zip(starts, [*starts[1:], len(text)], strict=True))

    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def __getstate__(self) -> dict:
        return {
            "vocab_path": self.path,
            "pattern": self.pattern,
            "vocab_size": self._vocab_size,
            "num_special_tokens": self.num_special_tokens,
        }

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, **state)


def _load_tiktoken_ranks(path: Path, max_entries: int, shift: int) -> dict[bytes, int]:
    """The first `max_entries` entries of a TikToken JSON vocabulary, ids shifted by `shift`."""
    import base64

    with open(path, encoding="utf-8") as f:
        vocab = json.load(f)
    if not isinstance(vocab, list) or len(vocab) < max_entries:
        found = len(vocab) if isinstance(vocab, list) else type(vocab).__name__
        raise ValueError(
            f"{path}: need a list of at least {max_entries} entries (--vocab-size minus the "
            f"special tokens), found {found}"
        )
    ranks = {}
    for i, entry in enumerate(vocab[:max_entries]):
        token = base64.b64decode(entry["token_bytes"])
        if entry["rank"] != i or (i < 256 and token != bytes([i])):
            raise ValueError(f"{path}: entry {i} is out of order or not byte {i}: {entry}")
        ranks[token] = i + shift
    if len(ranks) != max_entries:
        raise ValueError(f"{path}: duplicate token bytes among the first {max_entries} entries")
    return ranks


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | os.PathLike | None,
    hf_include_special_tokens: bool = True,
    tiktoken_pattern: str = "v2",
    vocab_size: int | None = None,
    tiktoken_num_special_tokens: int = 1000,
) -> Tokenizer:
    """The tokenizer for Megatron's `--tokenizer-type` and `--tokenizer-model` flags.

    `hf_include_special_tokens=False` is `--tokenizer-hf-no-include-special-tokens`; the
    TikToken settings are `--tiktoken-pattern`, `--vocab-size` and
    `--tiktoken-num-special-tokens`.
    """
    if tokenizer_model is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    if tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type in HUGGINGFACE_TYPES:
        return HuggingFaceTokenizer(tokenizer_model, hf_include_special_tokens)
    if tokenizer_type in TIKTOKEN_TYPES:
        return TikTokenizer(
            tokenizer_model, tiktoken_pattern, vocab_size or 2**17, tiktoken_num_special_tokens
        )
    raise ValueError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; use one of {TOKENIZER_TYPES}"
    )


def _split_on_special(text: str, specials: dict[str, int]) -> list[tuple[int, int, int | None]]:
    """``(start, end, id)`` stretches of `text`: each occurrence of a special token's text
    (its id; the longest first where they overlap) and the plain text between (None)."""
    if not specials:
        return [(0, len(text), None)] if text else []
    pattern = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
    stretches: list[tuple[int, int, int | None]] = []
    at = 0
    for match in pattern.finditer(text):
        if match.start() > at:
            stretches.append((at, match.start(), None))
        stretches.append((match.start(), match.end(), specials[match.group()]))
        at = match.end()
    if at < len(text):
        stretches.append((at, len(text), None))
    return stretches


def _optional_id(token_id: int) -> int | None:
    return None if token_id < 0 else token_id  # SentencePiece says -1 for "none"


def read_json(path: Path) -> dict:
    """The JSON object in `path`; {} when there is no such file (an optional config)."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def token_text(entry: str | dict | None) -> str | None:
    """The text of a special token as tokenizer_config.json stores it: a string or an
    AddedToken dict (``{"content": ...}``)."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


def tokenizer_flags_of_directory(directory: str | Path) -> dict[str, str]:
    """``--tokenizer-type`` / ``--tokenizer-model`` of a model directory's own tokenizer (a
    SentencePiece ``tokenizer.model`` or a HF ``tokenizer.json``), if it has one: conversion
    records them in the checkpoint, where the tools find their default."""
    directory = Path(directory).resolve()
    if (directory / "tokenizer.model").is_file():
        return {
            "tokenizer_type": "Llama2Tokenizer",
            "tokenizer_model": str(directory / "tokenizer.model"),
        }
    if (directory / "tokenizer.json").is_file():
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(directory)}
    return {}
