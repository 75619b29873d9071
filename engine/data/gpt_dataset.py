"""Megatron-style GPT dataset: fixed-length samples cut from a shuffled stream of documents.

For one `.bin/.idx` prefix and one split (train/valid/test) of its documents:

1. enough epochs are taken to supply `num_samples` samples of `seq_length + 1` tokens;
2. the document index lists the split's documents once per epoch, shuffled with
   `numpy.random.RandomState(seed)` (a short last epoch, under 80% of the samples of a full
   one, is shuffled on its own so its documents are not spread thin over every epoch);
3. the sample index (`engine.data.helpers.build_sample_idx`) marks where each sample starts
   in that stream, and the shuffle index permutes the samples with the same random state.

The three arrays are the same as Megatron-Core's `GPTDataset` builds for the same data,
split, seed and sizes, and are cached as `.npy` (see `engine.data.index_cache`).

A sample is a dict of `[seq_length]` tensors: `tokens`, `labels` (tokens shifted by one),
`loss_mask` (float), `position_ids`, and `attention_mask` (`[1, seq, seq]`, True = masked)
when asked for. EOD options: `reset_position_ids` restarts positions after each EOD,
`reset_attention_mask` stops attention across EODs, `eod_mask_loss` drops the loss on EOD.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from engine.data.index_cache import IndexCache
from engine.data.indexed_dataset import IndexedDataset, bin_path

SPLIT_NAMES = ("train", "valid", "test")
_INDEX_NAMES = ["document_index", "sample_index", "shuffle_index"]
_SEPARATE_LAST_EPOCH_BELOW = 0.80  # Megatron's threshold


@dataclass
class GPTDatasetConfig:
    """How samples are cut and what each returns."""

    seq_length: int
    """Tokens per sample (inputs; labels are the same window shifted by one)."""
    random_seed: int = 1234
    """Seeds the document and sample shuffles."""
    split: str = "969,30,1"
    """Relative sizes of train, valid, test, as Megatron's --split."""
    path_to_cache: str | None = None
    """Directory for the .npy indices; None: `{data dir}/cache/GPTDataset_indices`."""
    eod: int | None = None
    """End-of-document id (needed by the three EOD options)."""
    pad: int = -1
    """Id that pads a partial last sample (loss masked, replaced by 0 in tokens/labels)."""
    reset_position_ids: bool = False
    """Restart position ids after every EOD."""
    reset_attention_mask: bool = False
    """Block attention across EODs: samples carry `document_ids` (and the `attention_mask`
    with create_attention_mask)."""
    eod_mask_loss: bool = False
    """No loss on EOD positions."""
    create_attention_mask: bool = False
    """Return a `[1, seq, seq]` boolean mask (True = masked); fused kernels do not need it."""
    add_extra_token_to_sequence: bool = True
    """Draw seq_length + 1 tokens so inputs and labels both have seq_length."""
    drop_last_partial_validation_sequence: bool = True
    """Valid split: drop (True) or pad (False) the last partial sample."""
    vocab_size: int | None = None
    """Ids the model embeds; when set, a dataset holding an id at or above it is refused as
    it opens (the largest id of each `.bin` is computed once and cached)."""
    vocab_source: str = "the model's vocabulary"
    """Where ``vocab_size`` comes from (the tokenizer, ``--vocab-size``), for that error."""

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be at least 1, got {self.seq_length}")
        needs_eod = self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss
        if needs_eod and self.eod is None:
            raise ValueError("reset_position_ids/reset_attention_mask/eod_mask_loss need eod")


def parse_split(split: str) -> list[float]:
    """`"969,30,1"` -> normalised weights for train, valid, test (missing ones are 0)."""
    values = [float(v) for v in re.findall(r"[.0-9]+", split)]
    if not values or len(values) > 3 or sum(values) <= 0:
        raise ValueError(f"--split {split!r}: expected up to 3 non-negative weights, e.g. 969,30,1")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """Document ranges `[begin, end)` of train, valid, test (None for a zero weight)."""
    weights = parse_split(split)
    bounds = np.concatenate([[0.0], np.cumsum(weights)])
    ranges: list[tuple[int, int] | None] = []
    for i, weight in enumerate(weights):
        if weight == 0:
            ranges.append(None)
            continue
        begin = int(round(bounds[i] * num_documents))
        end = int(round(bounds[i + 1] * num_documents))
        ranges.append((begin, end))
    return ranges


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one indexed dataset.

    Args:
        indexed: the tokens (each of its sequences is one document).
        document_range: `[begin, end)` of the documents of this split.
        num_samples: samples wanted (None: one epoch's worth).
        config: the sample settings.
        split_name: "train", "valid" or "test" (in the cache file names and description).
        distributed: build the cache on rank 0 behind a barrier when a process group is up.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        document_range: tuple[int, int],
        num_samples: int | None,
        config: GPTDatasetConfig,
        split_name: str = "train",
        distributed: bool = True,
    ):
        begin, end = document_range
        if not 0 <= begin < end <= len(indexed):
            raise ValueError(
                f"{indexed.path_prefix}: document range [{begin}, {end}) is empty or outside "
                f"its {len(indexed)} documents (check --split {config.split})"
            )
        self.indexed = indexed
        self.config = config
        self.split_name = split_name
        self.documents = np.arange(begin, end, dtype=np.int32)
        self.tokens_per_epoch = int(indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
        extra = int(config.add_extra_token_to_sequence)
        if self.tokens_per_epoch <= extra + config.seq_length - 1:
            raise ValueError(
                f"{indexed.path_prefix}: the {split_name} split has {self.tokens_per_epoch} "
                f"tokens, too few for one sample of --seq-length {config.seq_length}"
            )
        self.num_samples = num_samples
        self.num_epochs = self._num_epochs()
        self.description = {
            "class": "GPTDataset",
            "path_prefix": os.path.abspath(indexed.path_prefix),
            "num_sequences": len(indexed),
            "num_tokens": indexed.num_tokens,
            "split": split_name,
            "document_range": [begin, end],
            "num_samples": num_samples,
            "seq_length": config.seq_length,
            "random_seed": config.random_seed,
            "add_extra_token_to_sequence": config.add_extra_token_to_sequence,
            "drop_last_partial_sequence": self._drop_last(),
        }
        cache = IndexCache(
            cache_dir(config, indexed.path_prefix), f"GPTDataset-{split_name}", self.description
        )
        arrays, self.built_cache = cache.build_or_load(_INDEX_NAMES, self._build, distributed)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _drop_last(self) -> bool:
        return self.split_name != "valid" or self.config.drop_last_partial_validation_sequence

    def _num_epochs(self) -> int:
        if self.num_samples is None:
            return 1
        needed = self.num_samples * self.config.seq_length + self.config.add_extra_token_to_sequence
        return max(1, -(-needed // self.tokens_per_epoch))

    def _build(self) -> dict[str, np.ndarray]:
        from engine.data import helpers

        seq, extra = self.config.seq_length, int(self.config.add_extra_token_to_sequence)
        epochs = self.num_epochs
        separate_last = False
        if epochs > 1:
            assert self.num_samples is not None  # None is one epoch (`_num_epochs`)
            before_last = ((epochs - 1) * self.tokens_per_epoch - extra) // seq
            per_epoch = (self.tokens_per_epoch - extra) // seq
            from_last = self.num_samples - before_last
            separate_last = from_last < int(_SEPARATE_LAST_EPOCH_BELOW * per_epoch)
        rng = np.random.RandomState(self.config.random_seed)
        document_index = build_document_index(self.documents, epochs, rng, separate_last)
        sample_index = helpers.build_sample_idx(
            np.asarray(self.indexed.sequence_lengths),
            document_index,
            seq,
            epochs,
            self.tokens_per_epoch,
            self._drop_last(),
            bool(extra),
        )
        num_samples = len(sample_index) - 1
        first = before_last if separate_last else num_samples
        shuffle_index = build_shuffle_index(first, num_samples, rng)
        return {
            "document_index": document_index,
            "sample_index": sample_index,
            "shuffle_index": shuffle_index,
        }

    def __len__(self) -> int:
        return len(self.sample_index) - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The `seq_length + extra` token ids of sample `idx` (padded with `config.pad`)."""
        i = int(self.shuffle_index[idx])
        (first, first_offset), (last, last_offset) = self.sample_index[i], self.sample_index[i + 1]
        extra = int(self.config.add_extra_token_to_sequence)
        get, doc = self.indexed.get, self.document_index
        if first == last:
            parts = [
                get(int(doc[first]), int(first_offset), int(last_offset - first_offset) + extra)
            ]
        else:
            parts = [get(int(doc[first]), int(first_offset))]
            parts += [get(int(doc[e])) for e in range(first + 1, last)]
            parts.append(get(int(doc[last]), 0, int(last_offset) + extra))
        want = self.config.seq_length + extra
        have = sum(len(p) for p in parts)
        if have < want:
            parts.append(np.full(want - have, self.config.pad, np.int64))
        return np.concatenate(parts, dtype=np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.sample_tokens(idx))
        if self.config.add_extra_token_to_sequence:
            tokens, labels = text[:-1].clone(), text[1:].clone()
        else:
            tokens = text
            labels = torch.roll(text, -1)
            labels[-1] = self.config.pad
        sample = ltor_masks_and_position_ids(tokens, self.config)
        padded = labels == self.config.pad
        sample["loss_mask"][padded] = 0.0
        tokens[tokens == self.config.pad] = 0  # keep embedding lookups in range
        labels[padded] = 0
        sample["tokens"], sample["labels"] = tokens, labels
        return sample


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool
) -> np.ndarray:
    """The documents once per epoch, shuffled (the last epoch on its own if `separate_last`)."""
    if separate_last and num_epochs > 1:
        head = build_document_index(documents, num_epochs - 1, rng, False)
        return np.concatenate([head, build_document_index(documents, 1, rng, False)])
    index = np.tile(documents.astype(np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_shuffle_index(first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of `[0, first)` followed by one of `[first, total)`."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(first, dtype=dtype)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def ltor_masks_and_position_ids(tokens: torch.Tensor, config: GPTDatasetConfig) -> dict:
    """Loss mask, position ids and (optionally) the causal attention mask of one sample.

    Vectorised: a token's segment is the number of EODs before it; with resets, positions
    count from the segment start and attention stays inside the segment.

    Args:
        tokens: `[seq]` token ids.

    Returns:
        `loss_mask` `[seq]` float, `position_ids` `[seq]` long, `document_ids` `[seq]` long
        (EODs strictly before each token) with `config.reset_attention_mask`, and
        `attention_mask` `[1, seq, seq]` bool (True = masked) when
        `config.create_attention_mask`.
    """
    seq = tokens.numel()
    is_eod = tokens == config.eod if config.eod is not None else torch.zeros(seq, dtype=torch.bool)
    loss_mask = torch.ones(seq, dtype=torch.float)
    if config.eod_mask_loss:
        loss_mask[is_eod] = 0.0
    positions = torch.arange(seq, dtype=torch.long)
    # segment[i] = number of EODs strictly before position i.
    segment = torch.cumsum(is_eod.long(), 0) - is_eod.long()
    if config.reset_position_ids:
        starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(is_eod)[:, 0] + 1])
        positions = positions - starts[segment]
    result = {"loss_mask": loss_mask, "position_ids": positions}
    if config.reset_attention_mask:
        # What the model's attention masks with: the document of each token (an EOD ends its
        # document), the [seq, seq] mask's information in [seq] integers.
        result["document_ids"] = segment
    if config.create_attention_mask:
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
        if config.reset_attention_mask:
            allowed &= segment[:, None] == segment[None, :]
        result["attention_mask"] = (~allowed).unsqueeze(0)
    return result


def cache_dir(config: GPTDatasetConfig, path_prefix: str, kind: str = "GPTDataset") -> str:
    """Where the index caches of a dataset live: ``--data-cache-path``, or beside the data."""
    return config.path_to_cache or os.path.join(
        os.path.dirname(os.path.abspath(path_prefix)), "cache", f"{kind}_indices"
    )


def check_token_ids(indexed: IndexedDataset, config: GPTDatasetConfig, distributed: bool) -> None:
    """Refuse a dataset with ids the model cannot embed (they would fail deep in the
    embedding, naming neither the data nor the tokenizer); the largest id is cached."""
    if config.vocab_size is None:
        return
    bpath = bin_path(indexed.path_prefix)
    stat = os.stat(bpath)
    description = {
        "class": "TokenRange", "path_prefix": os.path.abspath(indexed.path_prefix),
        "bin_bytes": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns,
    }  # fmt: skip
    cache = IndexCache(cache_dir(config, indexed.path_prefix), "TokenRange", description)
    arrays, _ = cache.build_or_load(
        ["max_token_id"], lambda: {"max_token_id": np.array([indexed.max_token_id()])}, distributed
    )
    largest = int(arrays["max_token_id"][0])
    if largest >= config.vocab_size:
        raise ValueError(
            f"{bpath}: holds token id {largest}, but {config.vocab_source} has "
            f"{config.vocab_size} ids (0..{config.vocab_size - 1}): the data was tokenized with "
            f"another tokenizer, or the vocabulary is too small"
        )


def build_gpt_datasets(
    path_prefix: str,
    num_samples: tuple[int | None, int | None, int | None],
    config: GPTDatasetConfig,
    distributed: bool = True,
) -> list[GPTDataset | None]:
    """Train, valid and test datasets of one prefix, split by `config.split`."""
    indexed = IndexedDataset(path_prefix)
    check_token_ids(indexed, config, distributed)
    ranges = split_ranges(config.split, len(indexed))
    return [
        None
        if span is None or span[0] == span[1]
        else GPTDataset(indexed, span, samples, config, name, distributed)
        for span, samples, name in zip(ranges, num_samples, SPLIT_NAMES, strict=True)
    ]
