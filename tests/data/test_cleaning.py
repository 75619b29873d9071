"""The cleaning stages (`engine.data.cleaning`), each on documents made to sit just inside and
just outside its limit:

- every quality rule alone: the document at its limit passes, one step past it is removed
  with the rule's reason; the default configuration keeps ordinary prose;
- normalisation (entities, NFC / NFKC, control characters, whitespace, C4's boilerplate
  lines) and PII masking (e-mail, IPv4, IPv6; version numbers untouched);
- MinHash: planted edited copies at measured Jaccard similarities (word 5-grams) are found
  (recall >= 0.95 at or above the threshold), no pair below threshold - 0.1 is removed, the
  signatures are the same in another process; the index's memory is what its docstring says.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import numpy as np
import pytest

from engine.data.cleaning import (
    MinHashConfig,
    MinHasher,
    NearDuplicateIndex,
    NormalizeConfig,
    QualityConfig,
    mask_pii,
    normalize,
    quality_reason,
    shingle_hashes,
    simplify,
)
from tests.paths import REPO

OFF = {f.name: None for f in dataclasses.fields(QualityConfig)
       if f.name not in ("short_line_chars", "min_script_fraction", "reject_lorem_ipsum",
                         "reject_curly_bracket")}  # fmt: skip


def only(**rule) -> QualityConfig:
    """Every rule off but the given one."""
    return QualityConfig(**{**OFF, "reject_lorem_ipsum": False, "reject_curly_bracket": False,
                            **rule})  # fmt: skip


def distinct(n: int, length: int = 5) -> list[str]:
    """``n`` different lower-case words of ``length`` letters."""
    out, i = [], 0
    while len(out) < n:
        word, k = "", i
        for _ in range(length):
            word, k = word + chr(ord("a") + k % 26), k // 26
        out.append(word)
        i += 7919  # a prime stride: neighbours share no prefix pattern
    return out


def text_lines(rows: list[str]) -> str:
    return "\n".join(rows)


def marked(count: int, total: int, mark, plain) -> str:
    """``total`` lines, the first ``count`` of them ``mark(i)``, the rest ``plain(i)``."""
    return text_lines([mark(i) if i < count else plain(i) for i in range(total)])


def ellipsis(i: int) -> str:
    return f"a{i}..."


def punctuated(i: int) -> str:
    return f"line {i}."


def unpunctuated(i: int) -> str:
    return f"line {i}"


def short(i: int) -> str:
    return f"s{i}"


def long(i: int) -> str:
    return "l" * 30 + str(i)


CASES = {
    "min_words": (50, " ".join(distinct(50)), " ".join(distinct(49)), "too_few_words"),
    "max_words": (100, " ".join(distinct(100)), " ".join(distinct(101)), "too_many_words"),
    "min_mean_word_length": (3, " ".join(["abc"] * 10), " ".join(["abc"] * 9 + ["ab"]),
                             "short_words"),
    "max_mean_word_length": (10, " ".join(["a" * 10] * 10),
                             " ".join(["a" * 10] * 9 + ["a" * 11]), "long_words"),
    "max_symbol_word_ratio": (0.1, " ".join(distinct(90) + ["#x"] * 10),
                              " ".join(distinct(89) + ["#x"] * 11), "symbols"),
    "max_bullet_lines": (0.9, text_lines(["- item"] * 9 + ["plain line"]),
                         text_lines(["- item"] * 10), "bullet_lines"),
    "max_ellipsis_lines": (0.3, marked(3, 10, ellipsis, short), marked(4, 10, ellipsis, short),
                           "ellipsis_lines"),
    "min_alpha_words": (0.8, " ".join(distinct(8) + ["12", "34"]),
                        " ".join(distinct(7) + ["12", "34", "56"]), "non_alphabetic"),
    "min_stop_words": (2, "the cat and dog", "the cat or dog", "no_stop_words"),
    # 10 lines: 3 repeating an earlier one are the limit, 4 past it.
    "max_duplicate_lines": (0.3, text_lines(distinct(6, 8) + ["same line"] * 4),
                            text_lines(distinct(5, 8) + ["same line"] * 5), "duplicate_lines"),
    "max_duplicate_paragraphs": (0.3, "\n\n".join(distinct(6, 8) + ["same"] * 4),
                                 "\n\n".join(distinct(5, 8) + ["same"] * 5),
                                 "duplicate_paragraphs"),
    # 10 lines of 40 characters and 9 newlines: 2 repeats are 80 / 409 <= 0.2, 3 are 120 / 409.
    "max_duplicate_line_chars": (0.2,
                                 text_lines([w * 5 for w in distinct(7, 8)] + ["r" * 40] * 3),
                                 text_lines([w * 5 for w in distinct(6, 8)] + ["r" * 40] * 4),
                                 "duplicate_line_chars"),
    # "xxxxx yyyyy" 5 times (50 characters) among 40 / 39 distinct 5-letter words: 50 / 250
    # is the limit, 50 / 245 past it.
    "max_top_ngram_chars": ({2: 0.2}, " ".join(distinct(40) + ["xxxxx yyyyy"] * 5),
                            " ".join(distinct(39) + ["xxxxx yyyyy"] * 5), "top_2gram"),
    "min_punctuated_lines": (0.12, marked(12, 100, punctuated, unpunctuated),
                             marked(11, 100, punctuated, unpunctuated), "unpunctuated_lines"),
    "max_short_lines": (0.67, marked(67, 100, short, long), marked(68, 100, short, long),
                        "short_lines"),
}  # fmt: skip
# A 5-gram of 5-letter words twice (50 characters) among n distinct words: the limit 0.15 is
# 50 / (5n + 50) at n = 56.7: 57 words are inside it, 56 past it.
GRAM = ["aaaaa", "bbbbb", "ccccc", "ddddd", "eeeee"]
CASES["max_duplicate_ngram_chars"] = (
    {5: 0.15},
    " ".join(distinct(57)[:30] + GRAM + distinct(57)[30:] + GRAM),
    " ".join(distinct(56)[:30] + GRAM + distinct(56)[30:] + GRAM),
    "duplicate_5grams",
)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_quality_rule_at_and_past_its_limit(rule):
    limit, inside, outside, reason = CASES[rule]
    config = only(**{rule: limit})
    assert quality_reason(inside, config) is None, rule
    assert quality_reason(outside, config) == reason, rule


def test_c4_page_rules_and_the_script_filter():
    assert quality_reason("a lorem ipsum page", only(reject_lorem_ipsum=True)) == "lorem_ipsum"
    assert quality_reason("code { here }", only(reject_curly_bracket=True)) == "curly_bracket"
    assert quality_reason("plain page", only(reject_lorem_ipsum=True)) is None
    latin = only(scripts=("latin",))
    # 65 Latin letters of 100 is the limit (0.65), 64 of 100 past it.
    assert quality_reason("a" * 65 + " " + "б" * 35, latin) is None
    assert quality_reason("a" * 64 + " " + "б" * 36, latin) == "script"
    assert quality_reason("漢字" * 10, only(scripts=("han",))) is None


def test_the_defaults_keep_prose_and_remove_boilerplate_shapes():
    prose = (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").read_text()[:3000]
    paragraph = " ".join(prose.split())  # one long line of ordinary English
    sentences = paragraph.replace(". ", ".\n")
    assert quality_reason(sentences, QualityConfig()) is None
    assert quality_reason("Home\nAbout\nContact\nLogin\n" * 20, QualityConfig()) is not None


def test_normalisation_steps():
    config = NormalizeConfig()
    assert normalize("caf\u0065\u0301 &amp; tea", config) == "café & tea"  # NFC, entity
    assert normalize("ﬁne Ｗｏｒｄ", NormalizeConfig(unicode_form="NFKC")) == "fine Word"
    assert normalize("ﬁne", config) == "ﬁne"  # NFC keeps compatibility forms
    assert normalize("zero\u200bwidth\x07 bell\ufeff", config) == "zerowidth bell"
    assert normalize("  a \t  b  \n\n\n\n c ", config) == "a b\n\nc"
    page = "Real text here.\nThis site uses cookies to work.\nEnable JavaScript please\nMore."
    assert normalize(page, config) == "Real text here.\nMore."
    assert normalize(page, NormalizeConfig(boilerplate_lines=False)).count("\n") == 3
    assert NormalizeConfig(unicode_form="NFD").errors() == [
        "--unicode-form must be NFC, NFKC or none, got 'NFD'"
    ]


def test_pii_masking():
    text = ("mail jane.doe+x@mail.example.org or ops@host.io from 192.168.0.12 and "
            "2001:db8::8a2e:370:7334, fe80::1; version 1.2.3 and 300.1.1.1 stay")  # fmt: skip
    masked, count = mask_pii(text)
    assert count == 5, masked
    assert masked == ("mail <EMAIL> or <EMAIL> from <IP_ADDRESS> and <IP_ADDRESS>, "
                      "<IP_ADDRESS>; version 1.2.3 and 300.1.1.1 stay")  # fmt: skip


# MinHash ------------------------------------------------------------------------------------


def jaccard(a: str, b: str, config: MinHashConfig) -> float:
    x, y = set(shingle_hashes(a, config).tolist()), set(shingle_hashes(b, config).tolist())
    return len(x & y) / len(x | y)


def planted_corpus(seed: int = 0, bases: int = 300, words: int = 200):
    """Random documents over the shared text's vocabulary, then one edited copy of each at a
    word-substitution rate spread over 0-10% (word 5-gram Jaccard from 1 down to about 0.4)."""
    vocabulary = sorted(set((REPO.parent / "shared" / "data" / "tinyshakespeare.txt")
                            .read_text().lower().split()))  # fmt: skip
    rng = random.Random(seed)
    documents = [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(bases)]
    copies = []
    for i, doc in enumerate(documents):
        tokens = doc.split()
        rate = 0.1 * i / bases
        for k in rng.sample(range(words), int(rate * words)):
            tokens[k] = rng.choice(vocabulary)
        copies.append(" ".join(tokens))
    return documents, copies


def test_minhash_finds_planted_near_duplicates_above_the_threshold_only():
    config = MinHashConfig()  # word 5-grams, 14 bands x 8 rows, threshold 0.8
    hasher, index = MinHasher(config), NearDuplicateIndex(config)
    documents, copies = planted_corpus()
    for doc in documents:
        assert index.check(hasher.signature(doc)) is None  # unrelated: all kept
    found_above = total_above = 0
    for i, (doc, copy) in enumerate(zip(documents, copies, strict=True)):
        similarity = jaccard(doc, copy, config)
        verdict = index.check(hasher.signature(copy))
        if similarity >= config.threshold:
            total_above += 1
            found_above += verdict is not None and verdict[0] == i
        elif similarity < config.threshold - 0.1:
            assert verdict is None, (i, similarity)
    below = sum(jaccard(d, c, config) < config.threshold - 0.1
                for d, c in zip(documents, copies, strict=True))  # fmt: skip
    assert total_above >= 50 and below >= 100
    assert found_above / total_above >= 0.95


def reference_shingles(text: str, ngram: int) -> set[int]:
    """Word n-gram hashes in plain Python: the regex simplification, xxh3 per word, the
    polynomial mod 2^64 (what `shingle_hashes` computes in numpy, with an ASCII fast path)."""
    import xxhash

    words = [xxhash.xxh3_64_intdigest(w.encode()) for w in simplify(text).split()]
    n = min(ngram, len(words))
    grams: set[int] = set()
    for start in range(len(words) - n + 1 if words else 0):
        value = 0
        for word in words[start : start + n]:
            value = (value * 0x100000001B3 + word) % 2**64
        grams.add(value)
    return grams


@pytest.mark.parametrize(
    "text",
    ["The cat_sat, on the MAT!!  (twice) 3 times: x1 y2 z3 -- done.\n\tnew line here",
     "Ünïcode wörds ß and ǅ mixed with ascii words to pass five", "one two", ""],
)  # fmt: skip
def test_shingles_and_signatures_equal_a_plain_python_reference(text):
    config = MinHashConfig()
    mine = shingle_hashes(text, config).tolist()
    assert mine == sorted(reference_shingles(text, config.ngram))
    hasher = MinHasher(config)
    if mine:  # each position: min over shingles of ((a h + b) mod 2^64) >> 32
        a, b = hasher.a[:, 0].tolist(), hasher.b[:, 0].tolist()
        expected = [
            min(((x * h + y) % 2**64) >> 32 for h in mine) for x, y in zip(a, b, strict=True)
        ]
        assert hasher.signature(text).tolist() == expected


def test_a_lower_agreement_bar_finds_more_pairs_at_the_threshold():
    """The estimate's spread hides pairs just above the threshold; two standard errors
    lower (0.72 at 0.8 with 112 hashes) finds them all here, and removes only candidates
    whose signatures still agree in 72% of positions."""
    documents, copies = planted_corpus(bases=400)
    found = {}
    for agreement in (None, 0.72):
        config = MinHashConfig(agreement=agreement)
        hasher, index = MinHasher(config), NearDuplicateIndex(config)
        for doc in documents:
            index.check(hasher.signature(doc))
        verdicts = [index.check(hasher.signature(copy)) for copy in copies]
        above = [
            jaccard(d, c, config) >= config.threshold
            for d, c in zip(documents, copies, strict=True)
        ]
        found[agreement] = sum(
            v is not None for v, a in zip(verdicts, above, strict=True) if a
        ) / sum(above)
        assert all(v is None or v[1] >= config.agreement_bar for v in verdicts)
    assert found[0.72] > found[None] and found[0.72] >= 0.98, found


def test_char_shingles_and_config_errors():
    config = MinHashConfig(ngram=4, shingles="char", threshold=0.7)
    hasher = MinHasher(config)
    a = "the quick brown fox jumps over the lazy dog " * 3
    assert np.array_equal(hasher.signature(a), hasher.signature(a.upper()))  # simplified first
    assert jaccard(a, a + "!", config) == 1.0
    assert MinHashConfig(bands=0, threshold=1.5, shingles="line", agreement=0).errors() == [
        "--minhash-bands must be at least 1, got 0",
        "--minhash-shingles must be word or char, got 'line'",
        "--minhash-threshold must be in (0, 1], got 1.5",
        "--minhash-agreement must be in (0, 1], got 0",
    ]


def test_signatures_are_the_same_in_another_process():
    code = ("from engine.data.cleaning import MinHasher, MinHashConfig as C;"
            "print(MinHasher(C()).signature('a b c d e f g h i j k').tolist())")  # fmt: skip
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout  # fmt: skip
    mine = MinHasher(MinHashConfig()).signature("a b c d e f g h i j k").tolist()
    assert other.strip() == str(mine)


def test_the_index_holds_what_its_docstring_says():
    """840 bytes a kept document at 14 x 8, with the bucket table at most half full (its
    size a power of two: between 1x and 2x of the entries' 24 bytes)."""
    config = MinHashConfig()
    hasher, index = MinHasher(config), NearDuplicateIndex(config)
    documents, _ = planted_corpus(bases=500, words=60)
    for doc in documents:
        index.check(hasher.signature(doc))
    assert index.kept == 500
    blocks = sum(b.nbytes for b in index._signatures + index._previous)
    assert blocks == -(-500 // index._BLOCK) * index._BLOCK * (448 + 56)
    assert 24 * 14 * 500 <= index.buckets.nbytes <= 2 * 24 * 14 * 500


def test_the_bucket_table_keeps_every_key_through_its_growth():
    """Keys that collide in their low bits (the table's slot) and random ones, past several
    doublings: each keeps its value; absent keys are absent; at most half the slots used."""
    from engine.data.cleaning import HashTable

    table = HashTable(capacity=16)
    colliding = [(k << 20) | 5 for k in range(1, 3000)]
    random_keys = np.random.default_rng(0).integers(1, 2**63, 5000, dtype=np.uint64).tolist()
    keys = colliding + random_keys
    for value, key in enumerate(keys):
        table.put(key, value)
    table.put(keys[0], 99)  # a new value for a present key
    assert table.size == len(keys) and 2 * table.size <= table._keys.size
    assert [table.get(k) for k in keys] == [99, *range(1, len(keys))]
    assert table.get((4000 << 20) | 5) is None and table.get(7) is None


def test_documents_without_words_are_not_near_duplicates_of_each_other():
    config = MinHashConfig()
    hasher, index = MinHasher(config), NearDuplicateIndex(config)
    verdicts = [index.check(hasher.signature(t)) for t in ("", "!!! ...", "--", "hello world")]
    assert verdicts == [None, None, None, None] and index.kept == 1
