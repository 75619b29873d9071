"""Data quality before tokenising: normalisation, quality filters, exact and MinHash
near-deduplication, PII masking (`tools/clean_data.py` runs them over a corpus)."""

from engine.data.cleaning.filters import QualityConfig, quality_reason, script_fraction
from engine.data.cleaning.minhash import (
    HashTable,
    MinHashConfig,
    MinHasher,
    NearDuplicateIndex,
    shingle_hashes,
    simplify,
)
from engine.data.cleaning.normalize import NormalizeConfig, mask_pii, normalize

__all__ = [
    "HashTable",
    "MinHashConfig",
    "MinHasher",
    "NearDuplicateIndex",
    "NormalizeConfig",
    "QualityConfig",
    "mask_pii",
    "normalize",
    "quality_reason",
    "script_fraction",
    "shingle_hashes",
    "simplify",
]
