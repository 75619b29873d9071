"""Near-duplicate detection with MinHash and locality-sensitive hashing (Broder 1997; the
banding of Leskovec, Rajaraman and Ullman, *Mining of Massive Datasets*, ch. 3), as datatrove's
and the GPT-3 / FineWeb pipelines run it.

- **Shingles**: word n-grams of the simplified text (lower case, letters and digits only,
  ``--minhash-ngram`` words, 5 by default as datatrove's) or character n-grams of it. Each is
  hashed to 64 bits without a Python loop over the shingles: words are hashed once each
  (xxh3), characters are their code points, and an n-gram's hash is a polynomial of its
  members' (wrapping uint64 arithmetic in numpy).
- **Signature**: ``bands x rows`` minima, one per hash function ``h -> (a·h + b) >> 32`` (odd
  ``a``: multiply-shift hashing), uint32. Two documents' signatures agree in a position with
  probability their Jaccard similarity.
- **LSH**: a document falls in one bucket per band (the hash of its ``rows`` values). Documents
  sharing a bucket are candidates: a pair of similarity ``J`` shares at least one band with
  probability ``1 - (1 - J^rows)^bands`` (14 x 8: 0.92 at J = 0.8, 0.24 at J = 0.6).
- **Decision** (`NearDuplicateIndex`): documents arrive in corpus order; one is a duplicate
  when a kept document shares a bucket with it and their signatures agree in at least
  ``threshold`` of positions (the estimated Jaccard; ``agreement`` sets another bar).
  Otherwise it is kept and indexed. So the first document of each group is kept, every
  removed one resembles a kept one, and the result depends only on the order (deterministic
  across workers and shards).

Memory, per kept document: ``bands`` bucket entries in an open-addressing table at most half
full (12 bytes a slot: 24 per entry), its signature (4 bytes a value) and its place in each
bucket's chain (4 bytes a band): at 14 x 8, 336 + 448 + 56 = 840 bytes, 0.84 GB per million
kept documents (removed ones cost nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import xxhash

_NON_WORD = re.compile(r"[^\w]+|_+")
_PRIME = np.uint64(0x100000001B3)  # FNV's 64-bit prime: the n-gram polynomial's base
# ASCII fast path of `simplify` + split: bytes.translate maps letters and digits to lower case
# and everything else to a space in one C pass (the regex takes ~45 us for 1 KB of text).
_ASCII_WORDS = bytes(ord(chr(c).lower()) if chr(c).isalnum() else 32 for c in range(128)) + bytes(
    range(128, 256)
)


@dataclass(frozen=True)
class MinHashConfig:
    """How documents are compared (``--minhash-*``)."""

    ngram: int = 5
    """Shingle length, in words or characters (``--minhash-ngram``)."""
    shingles: str = "word"
    """"word" or "char" n-grams (``--minhash-shingles``)."""
    bands: int = 14
    """LSH bands (``--minhash-bands``)."""
    rows: int = 8
    """Signature values per band (``--minhash-rows``)."""
    threshold: float = 0.8
    """Estimated Jaccard similarity at or above which a candidate is a duplicate
    (``--minhash-threshold``)."""
    agreement: float | None = None
    """Share of signature positions that must agree for a candidate to be removed
    (``--minhash-agreement``); None: ``threshold``. The agreement is an unbiased estimate of
    the Jaccard similarity with a standard error of ``sqrt(J (1 - J) / num_hashes)`` (0.038
    at J = 0.8 with 112 hashes), so at the threshold half the candidates fall short of it:
    a bar a standard error or two lower finds more of the pairs at or above the threshold,
    at the price of some below it (docs/cleaning.md has the measured trade-off)."""
    seed: int = 1
    """Seed of the hash functions: runs to be compared must share it."""

    @property
    def agreement_bar(self) -> float:
        return self.threshold if self.agreement is None else self.agreement

    @property
    def num_hashes(self) -> int:
        return self.bands * self.rows

    def errors(self) -> list[str]:
        """What is out of range, each naming its flag."""
        errors = []
        for flag, value in (("--minhash-ngram", self.ngram), ("--minhash-bands", self.bands),
                            ("--minhash-rows", self.rows)):  # fmt: skip
            if value < 1:
                errors.append(f"{flag} must be at least 1, got {value}")
        if self.shingles not in ("word", "char"):
            errors.append(f"--minhash-shingles must be word or char, got {self.shingles!r}")
        for flag, share in (("--minhash-threshold", self.threshold),
                            ("--minhash-agreement", self.agreement)):  # fmt: skip
            if share is not None and not 0 < share <= 1:
                errors.append(f"{flag} must be in (0, 1], got {share}")
        return errors


def simplify(text: str) -> str:
    """Lower case, letters and digits only, single spaces: what shingles are made of."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _ngram_hashes(members: np.ndarray, n: int) -> np.ndarray:
    """Distinct uint64 hashes of the ``n``-grams of a sequence of member hashes (one n-gram of
    them all when there are fewer than ``n``)."""
    if members.size == 0:
        return members
    n = min(n, members.size)
    with np.errstate(over="ignore"):
        count = members.size - n + 1
        hashes = members[:count].copy()
        for offset in range(1, n):
            hashes *= _PRIME  # arrays wrap silently; in place: no temporaries
            hashes += members[offset : count + offset]
    # np.unique's hash-based path costs ~10 us on a few hundred values; sort + mask ~3.
    hashes.sort()
    keep = np.empty(hashes.size, dtype=bool)
    keep[0] = True
    np.not_equal(hashes[1:], hashes[:-1], out=keep[1:])
    return hashes[keep]


def shingle_hashes(text: str, config: MinHashConfig) -> np.ndarray:
    """The distinct 64-bit hashes of ``text``'s shingles (empty for a text without words)."""
    if config.shingles == "word" and text.isascii():
        ascii_words = text.encode().translate(_ASCII_WORDS).split()
        hashes = np.fromiter(
            map(xxhash.xxh3_64_intdigest, ascii_words), np.uint64, len(ascii_words)
        )
        return _ngram_hashes(hashes, config.ngram)
    simple = simplify(text)
    if config.shingles == "char":
        codes = np.frombuffer(simple.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        return _ngram_hashes(codes, config.ngram)
    words = np.fromiter(
        (xxhash.xxh3_64_intdigest(word.encode()) for word in simple.split()), dtype=np.uint64
    )
    return _ngram_hashes(words, config.ngram)


class MinHasher:
    """``config.num_hashes`` hash functions, fixed by ``config.seed``."""

    def __init__(self, config: MinHashConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        high = np.iinfo(np.uint64).max
        self.a = (rng.integers(0, high, config.num_hashes, dtype=np.uint64, endpoint=True)
                  | np.uint64(1))[:, None]  # fmt: skip
        self.b = rng.integers(0, high, config.num_hashes, dtype=np.uint64, endpoint=True)[:, None]

    def signature(self, text: str) -> np.ndarray:
        """``[bands x rows]`` uint32 minima (all 0xFFFFFFFF for a text without shingles)."""
        hashes = shingle_hashes(text, self.config)
        if hashes.size == 0:
            return np.full(self.config.num_hashes, np.iinfo(np.uint32).max, dtype=np.uint32)
        # (a h + b) wraps silently in arrays; >> 32 is monotone, so it can follow the min.
        values = self.a * hashes[None, :]
        values += self.b
        return (values.min(axis=1) >> np.uint64(32)).astype(np.uint32)


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``[bands]`` nonzero uint64 bucket keys: each band's rows hashed with its band number
    (so equal rows in different bands are different buckets)."""
    keys = np.empty(bands, dtype=np.uint64)
    for band in range(bands):
        part = signature[band * rows : (band + 1) * rows].tobytes()
        keys[band] = xxhash.xxh3_64_intdigest(part, seed=band) or 1
    return keys


class HashTable:
    """A set of nonzero uint64 keys with a uint32 value each: open addressing in numpy arrays,
    at most half full (12 bytes a slot), so a million keys take 24 MB instead of a Python
    dict's ~100."""

    def __init__(self, capacity: int = 1 << 10):
        self._keys = np.zeros(capacity, dtype=np.uint64)
        self._values = np.zeros(capacity, dtype=np.uint32)
        self._mask = capacity - 1
        self.size = 0

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    def _slot(self, key: int) -> int:
        keys, i = self._keys, key & self._mask
        while True:
            found = int(keys[i])
            if found == 0 or found == key:
                return i
            i = (i + 1) & self._mask

    def get(self, key: int) -> int | None:
        i = self._slot(key)
        return None if self._keys[i] == 0 else int(self._values[i])

    def put(self, key: int, value: int) -> None:
        """Set ``key``'s value (``key`` must be nonzero)."""
        i = self._slot(key)
        if self._keys[i] == 0:
            self.size += 1
            if 2 * self.size > self._keys.size:
                self._grow()
                i = self._slot(key)
        self._keys[i], self._values[i] = key, value

    def _grow(self) -> None:
        """Double the table, reinserting every key at once: each round places the keys whose
        slot is free (the first of those wanting the same one) and moves the rest on a slot,
        so a doubling costs a few numpy passes, not a Python step per key."""
        used = np.flatnonzero(self._keys)
        keys, values = self._keys[used], self._values[used]
        self._keys = np.zeros(2 * self._keys.size, dtype=np.uint64)
        self._values = np.zeros(2 * self._values.size, dtype=np.uint32)
        self._mask = self._keys.size - 1
        slots = (keys & np.uint64(self._mask)).astype(np.int64)
        while keys.size:
            free = self._keys[slots] == 0
            _, first = np.unique(slots[free], return_index=True)
            placed = np.flatnonzero(free)[first]
            self._keys[slots[placed]], self._values[slots[placed]] = keys[placed], values[placed]
            rest = np.ones(keys.size, dtype=bool)
            rest[placed] = False
            keys, values = keys[rest], values[rest]
            slots = (slots[rest] + 1) & self._mask


class NearDuplicateIndex:
    """The kept documents' buckets and signatures (module docstring: the decision). A bucket
    is a chain: the table holds its latest kept document, each kept document the one before
    it in each of its buckets."""

    _BLOCK = 1 << 14
    _END = np.iinfo(np.uint32).max

    def __init__(self, config: MinHashConfig):
        self.config = config
        self.buckets = HashTable()
        self._signatures: list[np.ndarray] = []
        self._previous: list[np.ndarray] = []
        self.kept = 0

    def _row(self, blocks: list[np.ndarray], index: int) -> np.ndarray:
        return blocks[index // self._BLOCK][index % self._BLOCK]

    def check(self, signature: np.ndarray) -> tuple[int, float] | None:
        """``(kept index, estimated Jaccard)`` of a kept document this one duplicates, or None
        after keeping it. A document without shingles (no words) is kept and not indexed:
        its signature says nothing about similarity."""
        if bool((signature == np.iinfo(np.uint32).max).all()):
            return None
        keys = band_keys(signature, self.config.bands, self.config.rows)
        needed = self.config.agreement_bar * signature.size
        seen: set[int] = set()
        heads = []
        for band, key in enumerate(keys.tolist()):
            other = self.buckets.get(key)
            heads.append(other)
            while other is not None:
                if other not in seen:
                    seen.add(other)
                    agree = int(np.count_nonzero(self._row(self._signatures, other) == signature))
                    if agree >= needed:
                        return other, agree / signature.size
                before = int(self._row(self._previous, other)[band])
                other = None if before == self._END else before
        self._keep(signature, keys, heads)
        return None

    def _keep(self, signature: np.ndarray, keys: np.ndarray, heads: list[int | None]) -> None:
        index = self.kept
        if index % self._BLOCK == 0:
            self._signatures.append(np.empty((self._BLOCK, signature.size), dtype=np.uint32))
            self._previous.append(np.empty((self._BLOCK, keys.size), dtype=np.uint32))
        self._row(self._signatures, index)[:] = signature
        previous = self._row(self._previous, index)
        # The buckets' heads as check found them: no second lookup.
        for band, (key, holder) in enumerate(zip(keys.tolist(), heads, strict=True)):
            previous[band] = self._END if holder is None else holder
            self.buckets.put(key, index)
        self.kept += 1

    @property
    def nbytes(self) -> int:
        blocks = self._signatures + self._previous
        return self.buckets.nbytes + sum(block.nbytes for block in blocks)
