"""Long texts tokenized in bounded memory: cut at spaces into pieces whose ids, joined, are
the whole text's, where that is provable for the tokenizer (`cut_rule`: SentencePiece BPE
models that pass `cuts_keep_the_tokens`, TikToken).

A 50 MB text tokenized whole peaked at 2.3 GB: SentencePiece's working state for every
character at once, then 36 bytes per id as Python ints. In pieces of `PIECE_CHARS`, with at
most `_CHARS_IN_FLIGHT` characters being tokenized at once, it stays under 300 MB.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.tokenizer import SentencePieceTokenizer, TikTokenizer, Tokenizer

PIECE_CHARS = 1 << 18
"""A longer text is tokenized in pieces of about this many characters."""
_CHARS_IN_FLIGHT = 8 << 20  # at most this much of one long text is being tokenized at once

TokenIds = list[int] | np.ndarray
"""One text's ids: the tokenizer's list, or an array for a text tokenized in pieces."""


@dataclass(frozen=True)
class CutRule:
    """Where a tokenizer's long texts may be cut (before a space `at` matches), and whether
    the piece after a cut starts with that space (`keep_space`) or leaves it out."""

    at: re.Pattern[str]
    keep_space: bool


SENTENCEPIECE_CUTS = CutRule(re.compile(r"(?<! ) "), keep_space=False)
"""Before the first space of a run; SentencePiece's dummy prefix "▁" stands for the space
(`cuts_keep_the_tokens`)."""
TIKTOKEN_CUTS = CutRule(re.compile(r"(?<=\S) "), keep_space=True)
r"""Before a space that follows a non-whitespace character, the space kept. In TikToken's
pre-tokenizer patterns (`TikTokenizer.PATTERNS`) no split holds a non-whitespace character
followed by a space, so every such space starts a split: the splits of the text before it
and from it on are the whole text's (the regex alternatives see the same characters, and
the lookahead ``(?!\S)`` a space either way), and BPE merges within a split only. Special
tokens hold no spaces, so none is cut."""


def cut_rule(tokenizer: Tokenizer) -> CutRule | None:
    """How this tokenizer's long texts are cut so that the joined ids are the whole text's,
    or None to keep them whole. HuggingFace tokenizers stay whole: their normalizers,
    pre-tokenizers and post-processors (a BOS per call) vary too much to prove it."""
    if isinstance(tokenizer, SentencePieceTokenizer) and cuts_keep_the_tokens(tokenizer.path):
        return SENTENCEPIECE_CUTS
    if isinstance(tokenizer, TikTokenizer) and tokenizer.pattern in TikTokenizer.PATTERNS:
        return TIKTOKEN_CUTS
    return None


def text_pieces(text: str, piece_chars: int, rule: CutRule = SENTENCEPIECE_CUTS) -> Iterator[str]:
    """`text` in pieces of at least `piece_chars` characters (but the last), each cut before
    a space `rule.at` matches, which the piece after the cut starts with or leaves out.

    A text with no such space past `piece_chars` stays whole from there (text without
    spaces, such as Chinese, is not cut).
    """
    start = 0
    while len(text) - start > piece_chars:
        cut = rule.at.search(text, start + piece_chars)
        # At the last character the piece after it would be empty, which encodes to nothing
        # rather than to the "▁" the space is.
        if cut is None or (cut.start() == len(text) - 1 and not rule.keep_space):
            break
        yield text[start : cut.start()]
        start = cut.start() if rule.keep_space else cut.start() + 1
    yield text[start:]


def cuts_keep_the_tokens(model_path: str | os.PathLike) -> bool:
    """Whether this SentencePiece model gives a text's tokens when `text_pieces` are encoded
    one by one and their ids joined.

    SentencePiece normalizes the text, puts the dummy prefix "▁" in front, and BPE merges
    adjacent symbols (best-scored first) only into a vocabulary piece. If the normalizer maps
    each character on its own and the only whitespace change is " " -> "▁" (identity rules,
    no character map, no collapsing or trimming of spaces, whitespace as a prefix), then a
    piece cut before a space encodes, with its dummy prefix in place of that space, exactly
    the string the whole text has from the space on. If, further, no vocabulary piece holds
    "▁" after another character, no merge can join the symbol before the cut with the one
    after it, so both sides are merged independently, in the same order as alone: the ids
    are the same. Unigram models are not cut: their Viterbi search adds float scores across
    the cut, so a near-tie could break differently. LLaMA-2's model passes every check.
    """
    try:
        # Generated protobuf code: no types for mypy to read.
        sentencepiece_model_pb2: Any = importlib.import_module(
            "sentencepiece.sentencepiece_model_pb2"
        )
        model = sentencepiece_model_pb2.ModelProto.FromString(Path(model_path).read_bytes())
    # Without protobuf, or with a model it cannot read, keep texts whole: always correct.
    except Exception:
        return False
    bpe = sentencepiece_model_pb2.TrainerSpec.BPE
    normalizer = model.normalizer_spec
    if (
        model.trainer_spec.model_type != bpe
        or model.trainer_spec.treat_whitespace_as_suffix
        or normalizer.name != "identity"
        or normalizer.precompiled_charsmap
        or normalizer.normalization_rule_tsv
        or not normalizer.add_dummy_prefix
        or normalizer.remove_extra_whitespaces
        or not normalizer.escape_whitespaces
    ):
        return False
    joins = re.compile("[^▁]▁")  # "▁" after another character
    return not any(joins.search(piece.piece) for piece in model.pieces)


def tokenize_texts(
    texts: list[str],
    tokenizer: Tokenizer,
    workers: int,
    piece_chars: int | None,
    dtype: type[np.number],
    rule: CutRule = SENTENCEPIECE_CUTS,
) -> list[TokenIds]:
    """Token ids of each text, with the tokenizer's threaded batch encoder.

    With `piece_chars`, a longer text is tokenized in `text_pieces` cut by `rule`, at most
    `_CHARS_IN_FLIGHT` characters at a time, and its ids are kept as one array of `dtype`:
    memory stays bounded (module docstring).
    """
    if piece_chars is None or all(len(text) <= piece_chars for text in texts):
        return list(tokenizer.tokenize_batch(texts, num_threads=workers))
    ids: list[TokenIds] = []
    short = [text for text in texts if len(text) <= piece_chars]
    short_ids = iter(tokenizer.tokenize_batch(short, num_threads=workers))
    group = max(1, min(workers, _CHARS_IN_FLIGHT // piece_chars))
    for text in texts:
        if len(text) <= piece_chars:
            ids.append(next(short_ids))
            continue
        parts: list[np.ndarray] = []
        pieces = text_pieces(text, piece_chars, rule)
        while chunk := list(itertools.islice(pieces, group)):
            parts.extend(
                np.array(piece_ids, dtype)
                for piece_ids in tokenizer.tokenize_batch(chunk, num_threads=workers)
            )
        ids.append(np.concatenate(parts))
    return ids
