"""MinHash near-deduplication, ours (`engine.data.cleaning.minhash`) against datatrove's MinHash
pipeline: throughput on one core and agreement with planted duplicates, same corpus.

    python benchmarks/dedup.py [--documents 200000] [--words 200] [--planted 0.1]
                               [--repeats 1] [--text PATH] [--datatrove-precision 64]
                               [--agreement 0.72]

**Corpus** (a temporary JSONL file, ``{"id", "text"}`` a line). Base documents are sequences of
``--words`` whitespace tokens on average (half to 1.5 times that), drawn at random with their
frequencies from ``--text`` (tinyshakespeare in ``../shared/data``): punctuation and case
included, so that simplification matters, and mutually dissimilar (random sequences share no
word 5-grams; the corpus line reports the largest Jaccard similarity of a sample of base
pairs). A ``--planted`` share of the documents are copies of distinct base documents, each
placed after its source at a random later position: a sixth are exact duplicates (half
verbatim, half re-cased and re-wrapped, which simplification undoes), the others edited
copies (random word substitutions, insertions and deletions) aimed at a Jaccard similarity
drawn uniformly from [0.5, 1). Every pair's similarity is then measured exactly, on the sets of
word 5-gram hashes of our simplified text (`shingle_hashes`), and that is the ground truth of
both sides. datatrove's simplification differs slightly (digits become 0, diacritics are
dropped): the corpus line says in how many sampled documents its word sequence differs from
ours. In tinyshakespeare only the token "3" (27 of ~200,000) does, so about 3% of documents
differ by that one word, alike in a copy and its source.

**The sides**, one process, one core each, one after the other:

- **ours**: read the JSONL (`json.loads`, as `tools/clean_data.py` does), `MinHasher.signature`
  of each document, then `NearDuplicateIndex.check` in corpus order. A document is removed
  when ``check`` returns a match.
- **ours_agreement**: the same with ``--minhash-agreement`` (``--agreement``; by default
  the threshold less two standard errors of the estimate there, ``sqrt(t (1 - t) / 112)``:
  0.72 at 0.8): the signatures need agree only in that share of positions, which finds
  nearly every candidate pair at or above the threshold.
- **datatrove**: its four stages, each a `LocalPipelineExecutor` with one worker writing to
  a temporary folder: `MinhashDedupSignature` (one task: the JSONL read by `JsonlReader`),
  `MinhashDedupBuckets` (one task per bucket, run one after another: it demands as many),
  `MinhashDedupCluster` and `MinhashDedupFilter` (one task, reading the JSONL again). The
  filter's survivors' ids are written to a file; a document is removed when its id is not
  there. Its configuration is ours: word 5-grams, 14 buckets (bands) of 8 hashes (rows), seed
  1, xxhash shingle hashes, ``--datatrove-precision`` bit signatures (64, FineWeb's setting,
  by default). Two adaptations, both to its advantage or neutral: words are its simplified
  text split on whitespace (its English tokenizer is spaCy's, not installed here and slower;
  after its simplification there is no punctuation left to split on), and when the installed
  xxhash (4.x) refuses ``str``, which datatrove's xxhash wrapper passes it (it declares
  ``xxhash<4``), its shingle hash encodes the string first, as xxhash 3 did inside.

Each side's time is the median of ``--repeats`` rounds that alternate which runs first
(corpus generation excluded). datatrove removes every document that shares a bucket with an
earlier one (no similarity check); ours also requires the signatures to agree in at least
``--threshold`` of their positions (an estimate of the Jaccard similarity).

**Agreement.** A planted pair is found when its later document (the copy) is removed. Recall:
found pairs among those of exact Jaccard >= ``--threshold``. Precision: among all removed
documents, the copies of pairs at or above the threshold (a removed copy below it, or a removed
base document, is a false removal). Also printed: removals in the grey zone [threshold - 0.1,
threshold), below threshold - 0.1, and of base documents (background), and a table per
similarity bin. The last lines: each side's recall and precision (``ours_recall``,
``ours_agreement_recall``, ``datatrove_recall``, then the same for precision),
``ours_over_datatrove_docs_per_s`` and ``ours_agreement_over_datatrove_docs_per_s``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xxhash
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.hashing import HashConfig
from datatrove.utils.logging import logger, setup_default_logger
from datatrove.utils.text import simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.data.cleaning.minhash import (  # noqa: E402
    MinHashConfig,
    MinHasher,
    NearDuplicateIndex,
    shingle_hashes,
    simplify,
)

SHARED = REPO.parent / "shared" / "data"
EXACT_SHARE = 1 / 6  # of the planted copies: exact duplicates (J = 1)
BINS = (0.6, 0.7, 0.8, 0.9, 1.0)  # upper edges of the similarity table's rows (then J = 1)


@dataclass
class Corpus:
    """The JSONL file and its ground truth, by corpus position (= the document's id)."""

    path: Path
    size_bytes: int
    mean_words: float
    source: np.ndarray
    """Corpus position of a copy's source; -1 for a base document."""
    jaccard: np.ndarray
    """Exact Jaccard similarity of a copy with its source (NaN for a base document)."""
    background_max: float
    background_pairs: int
    simplify_differs: int
    simplify_sampled: int

    @property
    def documents(self) -> int:
        return self.source.size


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sets of distinct hashes (1 for two empty sets)."""
    common = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - common
    return common / union if union else 1.0


def _edited(tokens: list[str], plan: list[tuple[int, int, str]], edits: int) -> str:
    """``tokens`` after the first ``edits`` of ``plan`` (position, 0/1/2 for substitute /
    insert / delete, word), applied from the last position back so that each position still
    means the original token."""
    out = list(tokens)
    for position, op, word in sorted(plan[:edits], reverse=True):
        if op == 0:
            out[position] = word
        elif op == 1:
            out.insert(position, word)
        else:
            del out[position]
    return " ".join(out)


def near_copy(
    tokens: list[str], target: float, rng: np.random.Generator, sample_words, config: MinHashConfig
) -> tuple[str, float]:
    """An edited copy of the document ``tokens`` whose exact Jaccard similarity with it is
    the nearest to ``target`` among prefixes of one random edit plan, and that similarity."""
    source = shingle_hashes(" ".join(tokens), config)
    size = len(tokens)
    positions = rng.permutation(size)
    ops = rng.integers(0, 3, size)
    plan = list(zip(positions.tolist(), ops.tolist(), sample_words(size), strict=True))
    cache: dict[int, tuple[str, float]] = {}

    def similarity(edits: int) -> float:
        if edits not in cache:
            text = _edited(tokens, plan, edits)
            cache[edits] = text, jaccard(source, shingle_hashes(text, config))
        return cache[edits][1]

    # Each edit changes about `ngram` shingles: J ~ (S - n k) / (S + n k) for k edits far apart.
    # Overlapping edits change fewer, so bracket generously, then bisect: J falls with the
    # number of edits (not strictly, but the bracket's ends are on either side of the target).
    guess = int(size * (1 - target) / (config.ngram * (1 + target))) + 1
    low, high = 0, min(size, 3 * guess + 4)
    if similarity(high) >= target:
        high = size
    while high - low > 1:
        middle = (low + high) // 2
        if similarity(middle) >= target:
            low = middle
        else:
            high = middle
    # At least one edit: exact duplicates are planted as such, not by a target near 1.
    best = min((max(low, 1), high), key=lambda edits: abs(similarity(edits) - target))
    return cache[best]


def cosmetic_copy(text: str, rng: np.random.Generator) -> str:
    """The same words re-cased and re-wrapped: identical after simplification."""
    words = text.upper().split()
    breaks = rng.random(len(words)) < 0.1
    return "".join(w + ("\n" if b else "  ") for w, b in zip(words, breaks, strict=True)).strip()


def make_corpus(args: argparse.Namespace, directory: Path, config: MinHashConfig) -> Corpus:
    """Write the corpus (module docstring) and return its ground truth."""
    rng = np.random.default_rng(args.seed)
    counts = Counter(Path(args.text).read_text(encoding="utf-8").split())
    vocabulary = np.array(list(counts), dtype=object)
    frequency = np.array(list(counts.values()), dtype=np.float64)
    frequency /= frequency.sum()

    def sample_words(n: int) -> list[str]:
        return vocabulary[rng.choice(vocabulary.size, n, p=frequency)].tolist()

    copies = round(args.documents * args.planted)
    bases = args.documents - copies
    lengths = rng.integers(args.words // 2, args.words * 3 // 2 + 1, bases)
    base_tokens = np.split(np.array(sample_words(int(lengths.sum())), dtype=object),
                           np.cumsum(lengths)[:-1])  # fmt: skip
    texts = [" ".join(tokens) for tokens in base_tokens]
    sources = rng.choice(bases, copies, replace=False)
    similarities = []
    for i, source in enumerate(sources.tolist()):
        if rng.random() < EXACT_SHARE:
            text = texts[source] if i % 2 == 0 else cosmetic_copy(texts[source], rng)
            similarity = jaccard(*(shingle_hashes(t, config) for t in (texts[source], text)))
        else:
            target = rng.uniform(0.5, 1.0)
            tokens = base_tokens[source].tolist()
            text, similarity = near_copy(tokens, target, rng, sample_words, config)
        texts.append(text)
        similarities.append(similarity)

    # Corpus order: base documents at random places, each copy somewhere after its source.
    keys = rng.random(bases)
    copy_keys = keys[sources] + (1 - keys[sources]) * rng.random(copies)
    order = np.argsort(np.concatenate([keys, copy_keys]), kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    source = np.full(args.documents, -1, dtype=np.int64)
    source[position[bases:]] = position[sources]
    exact = np.full(args.documents, np.nan)
    exact[position[bases:]] = similarities

    path = directory / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, document in enumerate(order.tolist()):
            f.write(json.dumps({"id": str(i), "text": texts[document]}) + "\n")

    # Background: base pairs chosen at random (their planted copies aside) share ~nothing.
    pairs = min(2000, bases * (bases - 1) // 2)
    background = 0.0
    for _ in range(pairs):
        a, b = rng.choice(bases, 2, replace=False)
        background = max(background, jaccard(*(shingle_hashes(texts[i], config) for i in (a, b))))
    # datatrove judges its own simplification of the same text: count where the words differ.
    sampled = rng.choice(len(texts), min(2000, len(texts)), replace=False)
    differs = sum(simplify(texts[i]).split() != simplify_text(texts[i]).split() for i in sampled)
    return Corpus(path, path.stat().st_size, float(np.mean([len(t.split()) for t in texts])),
                  source, exact, background, pairs, int(differs), sampled.size)  # fmt: skip


@dataclass
class Run:
    """One side's pass over the corpus."""

    seconds: float
    removed: np.ndarray
    """Boolean, by corpus position."""
    parts: dict[str, float] = field(default_factory=dict)
    """Seconds per phase (ours) or stage (datatrove)."""


def run_ours(corpus: Corpus, config: MinHashConfig) -> Run:
    """Read, sign and check every document in corpus order (module docstring: ours)."""
    removed = np.zeros(corpus.documents, dtype=bool)
    read = sign = check = 0.0
    start = time.perf_counter()
    hasher, index = MinHasher(config), NearDuplicateIndex(config)
    with open(corpus.path, encoding="utf-8") as f:
        for position, line in enumerate(f):
            t0 = time.perf_counter()
            text = json.loads(line)["text"]
            t1 = time.perf_counter()
            signature = hasher.signature(text)
            t2 = time.perf_counter()
            removed[position] = index.check(signature) is not None
            t3 = time.perf_counter()
            read, sign, check = read + t1 - t0, sign + t2 - t1, check + t3 - t2
    seconds = time.perf_counter() - start
    return Run(seconds, removed, {"read": read, "signature": sign, "index": check})


class WhitespaceWords(WordTokenizer):
    """datatrove's words of its simplified text: split on whitespace (module docstring)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def _xxhash64_of_str(text: str) -> int:
    """datatrove's xxhash64 shingle hash as it runs under the xxhash 3 it declares (which
    hashed a ``str`` as its UTF-8 bytes; xxhash 4 refuses a ``str``)."""
    return xxhash.xxh64_intdigest(text.encode())


def _keep_ids(path: str):
    """A pipeline step (datatrove accepts callables) writing each surviving document's id."""

    def step(data, rank: int = 0, world_size: int = 1) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for document in data:
                f.write(f"{document.id}\n")

    return step


def run_datatrove(corpus: Corpus, config: MinHashConfig, precision: int, work: Path) -> Run:
    """datatrove's four MinHash stages in ``work`` (module docstring: datatrove)."""
    minhash = MinhashConfig(
        n_grams=config.ngram, num_buckets=config.bands, hashes_per_bucket=config.rows,
        seed=config.seed, hash_config=HashConfig(precision=precision, hash_fc="xxhash"),
    )  # fmt: skip
    folder = {name: str(work / name) for name in ("signatures", "buckets", "remove")}
    signature = MinhashDedupSignature(folder["signatures"], minhash, language=WhitespaceWords())
    try:
        signature._hash_func("a")
    except TypeError:
        signature._hash_func = _xxhash64_of_str
    kept_path = work / "kept.txt"
    corpus_folder = str(corpus.path.parent)
    reader = {"data_folder": corpus_folder, "glob_pattern": corpus.path.name}
    stages = {
        "signature": ([JsonlReader(**reader), signature], 1),
        "buckets": ([MinhashDedupBuckets(folder["signatures"], folder["buckets"], config=minhash)],
                    minhash.num_buckets),
        "cluster": ([MinhashDedupCluster(folder["buckets"], folder["remove"], config=minhash)], 1),
        "filter": ([JsonlReader(**reader), MinhashDedupFilter(folder["remove"]),
                    _keep_ids(str(kept_path))], 1),
    }  # fmt: skip
    parts = {}
    work.mkdir(parents=True)
    log = work / "datatrove.log"
    # Its log (and the cluster stage's progress bar) goes to a file, not this script's output.
    with open(log, "w") as stderr, contextlib.redirect_stderr(stderr):
        logger.remove()
        logger.add(sys.stderr)  # the file, now
        try:
            start = time.perf_counter()
            for name, (pipeline, tasks) in stages.items():
                t0 = time.perf_counter()
                LocalPipelineExecutor(
                    pipeline, tasks=tasks, workers=1, logging_dir=str(work / "logs" / name)
                ).run()
                parts[name] = time.perf_counter() - t0
            seconds = time.perf_counter() - start
        finally:
            setup_default_logger()
    kept = np.zeros(corpus.documents, dtype=bool)
    kept[[int(i) for i in kept_path.read_text().split()]] = True
    return Run(seconds, ~kept, parts)


def _counts(removed: np.ndarray, corpus: Corpus, threshold: float) -> dict[str, float]:
    """What a side removed, against the ground truth (module docstring: agreement)."""
    copy = corpus.source >= 0
    j = corpus.jaccard
    above = copy & (j >= threshold)
    # Rounded: 0.8 - 0.1 is 0.7000000000000001, which would put a pair of J = 7/10 below.
    floor = round(threshold - 0.1, 9)
    grey = copy & (j >= floor) & (j < threshold)
    below = copy & (j < floor)
    found = int(np.count_nonzero(removed & above))
    total = int(np.count_nonzero(removed))
    return {
        "found": found,
        "above": int(np.count_nonzero(above)),
        "grey": int(np.count_nonzero(removed & grey)),
        "below": int(np.count_nonzero(removed & below)),
        "background": int(np.count_nonzero(removed & ~copy)),
        "removed": total,
        "recall": found / max(int(np.count_nonzero(above)), 1),
        "precision": found / total if total else 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=200_000, help="documents in all")
    parser.add_argument("--words", type=int, default=200, help="mean tokens a base document")
    parser.add_argument("--planted", type=float, default=0.1, help="share of planted copies")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=MinHashConfig.threshold)
    parser.add_argument(
        "--agreement", type=float, default=None, help="ours_agreement's bar (default: module doc)"
    )
    parser.add_argument("--datatrove-precision", type=int, choices=(32, 64), default=64)
    parser.add_argument("--text", default=str(SHARED / "tinyshakespeare.txt"))
    parser.add_argument("--seed", type=int, default=0, help="of the corpus")
    args = parser.parse_args()
    if not os.path.isfile(args.text):
        raise SystemExit(f"--text {args.text}: not found (the shared data is beside the repo)")
    config = MinHashConfig(threshold=args.threshold)
    if args.agreement is None:
        spread = math.sqrt(args.threshold * (1 - args.threshold) / config.num_hashes)
        args.agreement = round(args.threshold - 2 * spread, 2)
    configs = {"ours": config, "ours_agreement": replace(config, agreement=args.agreement)}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        corpus = make_corpus(args, Path(tmp), config)
        copies = corpus.source >= 0
        exact = int(np.count_nonzero(corpus.jaccard == 1))
        print(
            f"corpus: {corpus.documents} documents ({corpus.documents - copies.sum()} base, "
            f"{copies.sum()} planted copies, {exact} of them at J = 1), "
            f"{corpus.size_bytes / 2**20:.1f} MiB of JSONL, {corpus.mean_words:.0f} tokens a "
            f"document on average; made in {time.perf_counter() - start:.1f} s"
        )
        print(
            f"background: largest Jaccard of {corpus.background_pairs} random base pairs "
            f"{corpus.background_max:.3f}; datatrove's simplified words differ from ours in "
            f"{corpus.simplify_differs} of {corpus.simplify_sampled} sampled documents"
        )
        runs: dict[str, list[Run]] = {"ours": [], "ours_agreement": [], "datatrove": []}
        for round_ in range(args.repeats):
            order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for side in order:
                if side in configs:
                    runs[side].append(run_ours(corpus, configs[side]))
                else:
                    work = Path(tmp) / f"datatrove_{round_}"
                    runs[side].append(run_datatrove(corpus, config, args.datatrove_precision,
                                                    work))  # fmt: skip
                    shutil.rmtree(work)  # its signatures take ~1 KB a document

    seconds = {side: statistics.median(r.seconds for r in runs[side]) for side in runs}
    rate = {side: corpus.documents / seconds[side] for side in runs}
    # Both sides are deterministic (fixed seeds): the first round's decisions stand for all.
    counts = {side: _counts(runs[side][0].removed, corpus, args.threshold) for side in runs}
    print(f"one core each, median of {args.repeats}; {config.bands} bands x {config.rows} "
          f"rows, word {config.ngram}-grams; ours_agreement at {args.agreement}")  # fmt: skip
    for side in runs:
        parts = ", ".join(
            f"{name} {statistics.median(r.parts[name] for r in runs[side]):.2f} s"
            for name in runs[side][0].parts
        )
        print(f"{side}: {seconds[side]:.2f} s, {rate[side]:.0f} documents/s ({parts})")
    print(f"pairs by exact Jaccard: pairs, removed by {', '.join(runs)}")
    low = -np.inf
    for high in (*BINS, np.inf):
        j = corpus.jaccard
        in_bin = copies & (j >= low) & (j < high) if high <= 1 else copies & (j == 1)
        label = "J = 1" if high > 1 else f"J in [{max(low, 0):.1f}, {high:.1f})"
        found = [int(np.count_nonzero(runs[side][0].removed & in_bin)) for side in runs]
        print(f"  {label}: {', '.join(map(str, [int(np.count_nonzero(in_bin)), *found]))}")
        low = high
    for side, c in counts.items():
        print(
            f"{side}: removed {c['removed']}: {c['found']} of {c['above']} copies at J >= "
            f"{args.threshold}, {c['grey']} in [{args.threshold - 0.1:.1f}, {args.threshold}), "
            f"{c['below']} below {args.threshold - 0.1:.1f}, {c['background']} base documents"
        )
    for side in runs:
        print(f"{side}_docs_per_s={rate[side]:.0f}")
    for kind in ("grey", "below", "background"):
        for side in runs:
            print(f"{side}_removed_{kind}={counts[side][kind]}")
    for kind in ("recall", "precision"):
        for side in runs:
            print(f"{side}_{kind}={counts[side][kind]:.3f}")
    for side in configs:
        print(f"{side}_over_datatrove_docs_per_s={rate[side] / rate['datatrove']:.3f}")


if __name__ == "__main__":
    main()
