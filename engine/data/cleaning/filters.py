"""Document quality filters: Gopher's (Rae et al. 2021, appendix A), C4's and FineWeb's
(Penedo et al. 2024) heuristics, and a language-script filter that needs no model.

`quality_reason(text, config)` returns the first rule a document breaks (a short name, the
report's reason) or None. The rules and their defaults, each a field of `QualityConfig` (set
one to None to turn it off):

Gopher quality
- ``min_words`` 50 / ``max_words`` 100,000 words (whitespace-separated);
- ``min_mean_word_length`` 3 / ``max_mean_word_length`` 10 characters;
- ``max_symbol_word_ratio`` 0.1: "#" and "..." / "…" per word;
- ``max_bullet_lines`` 0.9: fraction of lines starting with a bullet;
- ``max_ellipsis_lines`` 0.3: fraction of lines ending in an ellipsis;
- ``min_alpha_words`` 0.8: fraction of words with at least one letter (the non-alphabetic
  ratio's complement);
- ``min_stop_words`` 2 of the, be, to, of, and, that, have, with.

Gopher repetition
- ``max_duplicate_lines`` 0.3 / ``max_duplicate_paragraphs`` 0.3: fraction of lines
  (paragraphs: blocks between empty lines) that repeat an earlier one;
- ``max_duplicate_line_chars`` 0.2 / ``max_duplicate_paragraph_chars`` 0.2: the same, in
  characters;
- ``max_top_ngram_chars``: {2: 0.2, 3: 0.18, 4: 0.16}: characters covered by the most
  frequent n-gram of words;
- ``max_duplicate_ngram_chars``: {5: 0.15, ..., 10: 0.10}: characters covered by n-grams
  that occur more than once.

C4 / FineWeb
- ``min_punctuated_lines`` 0.12: fraction of lines ending in terminal punctuation (FineWeb's
  relaxation of C4's every line);
- ``max_short_lines`` 0.67: fraction of lines under 30 characters (FineWeb);
- ``reject_lorem_ipsum`` and ``reject_curly_bracket``: C4 drops pages with either.

Script
- ``scripts``: keep a document only if at least ``min_script_fraction`` (0.65) of its letters
  are in these Unicode scripts ("latin", "cyrillic", "han", ...: the first word of each
  letter's Unicode name, so no language model is downloaded). None: any script.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import numpy as np

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·", "‣", "➢", "✓")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…")
_SCRIPT_ALIASES = {"cjk": "han", "hangul": "hangul", "hiragana": "hiragana"}


def _default_top_ngrams() -> dict[int, float]:
    return {2: 0.2, 3: 0.18, 4: 0.16}


def _default_duplicate_ngrams() -> dict[int, float]:
    return {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@dataclass(frozen=True)
class QualityConfig:
    """The rules' limits (module docstring); None turns a rule off."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3
    max_mean_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alpha_words: float | None = 0.8
    min_stop_words: int | None = 2
    max_duplicate_lines: float | None = 0.3
    max_duplicate_paragraphs: float | None = 0.3
    max_duplicate_line_chars: float | None = 0.2
    max_duplicate_paragraph_chars: float | None = 0.2
    max_top_ngram_chars: dict[int, float] | None = field(default_factory=_default_top_ngrams)
    max_duplicate_ngram_chars: dict[int, float] | None = field(
        default_factory=_default_duplicate_ngrams
    )
    min_punctuated_lines: float | None = 0.12
    max_short_lines: float | None = 0.67
    short_line_chars: int = 30
    reject_lorem_ipsum: bool = True
    reject_curly_bracket: bool = True
    scripts: tuple[str, ...] | None = None
    min_script_fraction: float = 0.65


def _fraction(count: int, total: int) -> float:
    return count / total if total else 0.0


def _repeated(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count, chars = count + 1, chars + len(item)
        else:
            seen.add(item)
    return count, chars


class _WordGrams:
    """A document's words as integers, for counting its word n-grams in numpy: each n-gram is
    a polynomial hash of its words' ids (distinct words, distinct ids; uint64 arithmetic)."""

    def __init__(self, words: list[str]):
        ids: dict[str, int] = {}
        self.ids = np.array([ids.setdefault(w, len(ids) + 1) for w in words], dtype=np.uint64)
        self.lengths = np.array([len(w) for w in words], dtype=np.int64)

    def grams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the n-gram at each start as an index into the distinct ones, their counts, the
        characters of the n-gram at each start)."""
        count = self.ids.size - n + 1
        hashes = self.ids[:count].copy()
        with np.errstate(over="ignore"):
            for k in range(1, n):
                hashes = hashes * np.uint64(1_000_003) + self.ids[k : k + count]
        _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
        chars = np.convolve(self.lengths, np.ones(n, dtype=np.int64), mode="valid")
        return inverse, counts, chars

    def top_chars(self, n: int) -> int:
        """Characters of the most frequent n-gram, times its count (Gopher)."""
        if self.ids.size < n:
            return 0
        inverse, counts, chars = self.grams(n)
        top = int(np.argmax(counts))
        return int(chars[np.argmax(inverse == top)]) * int(counts[top])

    def duplicate_chars(self, n: int) -> int:
        """Characters of the words covered by n-grams that occur more than once (each word
        counted once, Gopher)."""
        if self.ids.size < n:
            return 0
        inverse, counts, _ = self.grams(n)
        starts = np.flatnonzero(counts[inverse] > 1)
        cover = np.zeros(self.ids.size + 1, dtype=np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        return int(self.lengths[np.cumsum(cover[:-1]) > 0].sum())


def script_of(char: str) -> str | None:
    """The Unicode script of a letter, by the first word of its name ("latin", "cyrillic",
    "han" for CJK ideographs); None for a character that is not a letter."""
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    if not name:
        return None
    first = name.split(" ", 1)[0].lower()
    return _SCRIPT_ALIASES.get(first, first)


def script_fraction(text: str, scripts: tuple[str, ...]) -> float:
    """The fraction of ``text``'s letters in ``scripts`` (0 without letters)."""
    letters = inside = 0
    wanted = set(scripts)
    for char in text:
        script = script_of(char)
        if script is not None:
            letters += 1
            inside += script in wanted
    return _fraction(inside, letters)


def quality_reason(text: str, config: QualityConfig) -> str | None:
    """The first rule ``text`` breaks (a reason of the report), or None."""
    c = config
    words = text.split()
    n = len(words)
    if c.min_words is not None and n < c.min_words:
        return "too_few_words"
    if c.max_words is not None and n > c.max_words:
        return "too_many_words"
    mean_length = _fraction(sum(len(w) for w in words), n)
    if c.min_mean_word_length is not None and mean_length < c.min_mean_word_length:
        return "short_words"
    if c.max_mean_word_length is not None and mean_length > c.max_mean_word_length:
        return "long_words"
    if c.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if _fraction(symbols, n) > c.max_symbol_word_ratio:
            return "symbols"
    lines = [line for line in text.split("\n") if line.strip()]
    if c.max_bullet_lines is not None:
        bullets = sum(line.lstrip().startswith(BULLETS) for line in lines)
        if _fraction(bullets, len(lines)) > c.max_bullet_lines:
            return "bullet_lines"
    if c.max_ellipsis_lines is not None:
        ellipses = sum(line.rstrip().endswith(("...", "…")) for line in lines)
        if _fraction(ellipses, len(lines)) > c.max_ellipsis_lines:
            return "ellipsis_lines"
    if c.min_alpha_words is not None:
        alpha = sum(any(ch.isalpha() for ch in w) for w in words)
        if _fraction(alpha, n) < c.min_alpha_words:
            return "non_alphabetic"
    if c.min_stop_words is not None:
        if sum(w.lower() in STOP_WORDS for w in words) < c.min_stop_words:
            return "no_stop_words"
    reason = _repetition_reason(text, lines, words, c)
    if reason is not None:
        return reason
    if c.min_punctuated_lines is not None:
        ended = sum(line.rstrip().endswith(TERMINAL_PUNCTUATION) for line in lines)
        if _fraction(ended, len(lines)) < c.min_punctuated_lines:
            return "unpunctuated_lines"
    if c.max_short_lines is not None:
        short = sum(len(line.strip()) < c.short_line_chars for line in lines)
        if _fraction(short, len(lines)) > c.max_short_lines:
            return "short_lines"
    if c.reject_lorem_ipsum and "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    if c.reject_curly_bracket and "{" in text:
        return "curly_bracket"
    if c.scripts is not None and script_fraction(text, c.scripts) < c.min_script_fraction:
        return "script"
    return None


def _repetition_reason(
    text: str, lines: list[str], words: list[str], c: QualityConfig
) -> str | None:
    chars = max(len(text), 1)
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    for items, most, most_chars, name in (
        (lines, c.max_duplicate_lines, c.max_duplicate_line_chars, "line"),
        (paragraphs, c.max_duplicate_paragraphs, c.max_duplicate_paragraph_chars, "paragraph"),
    ):
        count, repeated_chars = _repeated(items)
        if most is not None and _fraction(count, len(items)) > most:
            return f"duplicate_{name}s"
        if most_chars is not None and repeated_chars / chars > most_chars:
            return f"duplicate_{name}_chars"
    if not (c.max_top_ngram_chars or c.max_duplicate_ngram_chars):
        return None
    grams = _WordGrams(words)
    word_chars = max(int(grams.lengths.sum()), 1)
    for n, most in sorted((c.max_top_ngram_chars or {}).items()):
        if grams.top_chars(n) / word_chars > most:
            return f"top_{n}gram"
    for n, most in sorted((c.max_duplicate_ngram_chars or {}).items()):
        repeated = grams.duplicate_chars(n)
        if repeated / word_chars > most:
            return f"duplicate_{n}grams"
        if repeated == 0:  # no n-gram repeats, so no longer one does
            break
    return None
