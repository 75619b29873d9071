"""The cleaning pipeline of one corpus: per document, in this order,

1. normalisation (`engine.data.cleaning.normalize`), a document left empty is removed;
2. quality filters (`engine.data.cleaning.filters`), the first rule broken is the reason;
3. PII masking (optional);
4. exact deduplication: a document whose normalised text hashes (BLAKE2b, 64 bits) as an
   earlier kept one's is removed;
5. near deduplication (`engine.data.cleaning.minhash`).

Steps 1-3 and the hashes of 4-5 depend on the document alone: `process_records` runs them in
worker processes. The decisions of 4-5 depend on what came before: `Deduplicator` takes the
documents in corpus order in one process, so the result is the same for any number of workers
and, through `tools/clean_data.py --shard` and ``--merge``, for any sharding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.data.cleaning.filters import QualityConfig, quality_reason
from engine.data.cleaning.minhash import HashTable, MinHashConfig, MinHasher, NearDuplicateIndex
from engine.data.cleaning.normalize import NormalizeConfig, mask_pii, normalize

STAGES = ("input", "normalize", "quality", "exact_dedup", "near_dedup")
"""The report's stages, in pipeline order (``input``: records without the text field)."""


@dataclass(frozen=True)
class CleanConfig:
    """Which stages run and how (None: the stage is off)."""

    text_key: str = "text"
    normalize: NormalizeConfig | None = field(default_factory=NormalizeConfig)
    quality: QualityConfig | None = field(default_factory=QualityConfig)
    mask_pii: bool = False
    exact_dedup: bool = True
    minhash: MinHashConfig | None = field(default_factory=MinHashConfig)

    def errors(self) -> list[str]:
        errors = [] if self.normalize is None else self.normalize.errors()
        return errors + ([] if self.minhash is None else self.minhash.errors())


@dataclass
class Outcome:
    """One document after the per-document steps."""

    line: str | None
    """The cleaned record as a JSON line (no newline), or None when a filter removed it."""
    stage: str | None
    """The stage that removed it (of `STAGES`), or None."""
    reason: str | None
    """Why (a filter's name), or None."""
    size_bytes: int
    """UTF-8 bytes of the original text (what the report counts as removed)."""
    record: dict[str, Any] | None = None
    """The original record, kept only for a removed document (the report's samples)."""
    exact_hash: int = 0
    signature: np.ndarray | None = None


def exact_hash(text: str) -> int:
    """A nonzero 64-bit hash of ``text`` (BLAKE2b)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def _removed(record: dict[str, Any], stage: str, reason: str, size: int) -> Outcome:
    return Outcome(None, stage, reason, size, record=record)


def process_records(records: list[dict[str, Any]], config: CleanConfig) -> list[Outcome]:
    """Steps 1-3 and the deduplication hashes of each record (a worker's batch)."""
    hasher = _hasher(config.minhash)
    outcomes = []
    for record in records:
        text = record.get(config.text_key)
        if not isinstance(text, str):
            outcomes.append(_removed(record, "input", f"no_{config.text_key}", 0))
            continue
        size = len(text.encode())
        if config.normalize is not None:
            text = normalize(text, config.normalize)
            if not text:
                outcomes.append(_removed(record, "normalize", "empty", size))
                continue
        if config.quality is not None:
            reason = quality_reason(text, config.quality)
            if reason is not None:
                outcomes.append(_removed(record, "quality", reason, size))
                continue
        if config.mask_pii:
            text, _ = mask_pii(text)
        cleaned = {**record, config.text_key: text}
        outcome = Outcome(json.dumps(cleaned, ensure_ascii=False), None, None, size)
        if config.exact_dedup:
            outcome.exact_hash = exact_hash(text)
        if hasher is not None:
            outcome.signature = hasher.signature(text)
        outcomes.append(outcome)
    return outcomes


_HASHERS: dict[MinHashConfig, MinHasher] = {}


def _hasher(config: MinHashConfig | None) -> MinHasher | None:
    """One `MinHasher` per configuration and process (its hash functions cost a draw)."""
    if config is None:
        return None
    if config not in _HASHERS:
        _HASHERS[config] = MinHasher(config)
    return _HASHERS[config]


class Deduplicator:
    """Steps 4-5 over outcomes in corpus order: fills in the stage and reason of duplicates."""

    def __init__(self, config: CleanConfig):
        self.exact = HashTable() if config.exact_dedup else None
        self.near = None if config.minhash is None else NearDuplicateIndex(config.minhash)

    def decide(self, outcome: Outcome) -> None:
        if outcome.line is None:
            return
        if self.exact is not None:
            if self.exact.get(outcome.exact_hash) is not None:
                outcome.stage, outcome.reason = "exact_dedup", "exact_duplicate"
                return
        if self.near is not None and outcome.signature is not None:
            if self.near.check(outcome.signature) is not None:
                outcome.stage, outcome.reason = "near_dedup", "near_duplicate"
                return
        if self.exact is not None:
            self.exact.put(outcome.exact_hash, 1)


@dataclass
class Report:
    """Documents and bytes in, kept and removed (per stage and per reason), and the first
    ``samples_per_reason`` removed records of each reason."""

    samples_per_reason: int = 20
    documents: int = 0
    bytes: int = 0
    kept_documents: int = 0
    kept_bytes: int = 0
    removed: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """stage -> reason -> [documents, bytes]."""
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def count(self, outcome: Outcome) -> None:
        """Count one document; a removed one is sampled (its original record, or its cleaned
        one when deduplication removed it)."""
        self.documents += 1
        self.bytes += outcome.size_bytes
        if outcome.stage is None:
            self.kept_documents += 1
            self.kept_bytes += outcome.size_bytes
            return
        assert outcome.reason is not None
        entry = self.removed.setdefault(outcome.stage, {}).setdefault(outcome.reason, [0, 0])
        entry[0] += 1
        entry[1] += outcome.size_bytes
        samples = self.samples.setdefault(outcome.reason, [])
        if len(samples) < self.samples_per_reason:
            original = outcome.record
            if original is None and outcome.line is not None:
                original = json.loads(outcome.line)
            samples.append(original or {})

    def merge(self, other: Report) -> None:
        """Add ``other``'s counts (a later part of the corpus) and its samples after ours."""
        self.documents += other.documents
        self.bytes += other.bytes
        self.kept_documents += other.kept_documents
        self.kept_bytes += other.kept_bytes
        for stage, reasons in other.removed.items():
            for reason, (docs, size) in reasons.items():
                entry = self.removed.setdefault(stage, {}).setdefault(reason, [0, 0])
                entry[0] += docs
                entry[1] += size
        for reason, samples in other.samples.items():
            mine = self.samples.setdefault(reason, [])
            mine.extend(samples[: self.samples_per_reason - len(mine)])

    def to_dict(self) -> dict[str, Any]:
        """The counts, stages in pipeline order and reasons sorted (the same for any run
        order)."""
        removed = {stage: dict(sorted(self.removed[stage].items()))
                   for stage in STAGES if stage in self.removed}  # fmt: skip
        return {
            "documents": self.documents, "bytes": self.bytes,
            "kept_documents": self.kept_documents, "kept_bytes": self.kept_bytes,
            "removed": removed,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any], samples_per_reason: int) -> Report:
        report = cls(samples_per_reason)
        report.documents, report.bytes = data["documents"], data["bytes"]
        report.kept_documents, report.kept_bytes = data["kept_documents"], data["kept_bytes"]
        report.removed = data["removed"]
        return report

    def removed_documents(self, stage: str | None = None) -> int:
        stages = [stage] if stage is not None else list(self.removed)
        return sum(d for s in stages for d, _ in self.removed.get(s, {}).values())

    def table(self) -> str:
        """The closing report: one line per stage and reason."""
        lines = [f"{self.documents:,} documents ({self.bytes / 2**20:,.1f} MiB) in, "
                 f"{self.kept_documents:,} ({self.kept_bytes / 2**20:,.1f} MiB) kept"]  # fmt: skip
        for stage in STAGES:
            reasons = self.removed.get(stage, {})
            if not reasons:
                continue
            docs = sum(d for d, _ in reasons.values())
            size = sum(b for _, b in reasons.values())
            lines.append(f"  {stage}: removed {docs:,} documents ({size / 2**20:,.2f} MiB)")
            for reason, (d, b) in sorted(reasons.items(), key=lambda item: -item[1][0]):
                lines.append(f"    {reason}: {d:,} ({b / 2**20:,.2f} MiB)")
        return "\n".join(lines)
