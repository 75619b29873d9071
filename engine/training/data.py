"""The trainer's data: tokenizer, train/valid/test datasets, and per-rank batch iterators.

Pretraining reads Megatron's ``--data-path`` (one prefix, or a weighted blend) split by
``--split`` into GPT datasets sized for the run; fine-tuning (``--sft``) reads chat JSONL, or
its preprocessed ``{prefix}_tokens_document`` / ``{prefix}_loss_mask_document`` pair, packed
into rows of ``--seq-length`` (`engine.data.sft_dataset`).

Every data-parallel rank iterates its own slice of each global batch, starting after
``consumed_samples``: that count is all a checkpoint needs to resume the data exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine.context_parallel import split_batch
from engine.data.blended_dataset import build_blended_gpt_datasets
from engine.data.config import DataConfig
from engine.data.gpt_dataset import GPTDatasetConfig, parse_split
from engine.data.samplers import build_data_loader, dataset_length
from engine.data.sft_dataset import SFTDataset
from engine.data.tokenizer import Tokenizer, build_tokenizer
from engine.training.config import JobConfig

Batch = dict[str, torch.Tensor]


@dataclass
class Datasets:
    """The three splits (valid/test may be None) and the tokenizer, if one was configured."""

    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None
    tokenizer: Tokenizer | None


def build_job_tokenizer(data: DataConfig) -> Tokenizer | None:
    """The tokenizer of ``--tokenizer-type`` / ``--tokenizer-model``, or None when not given
    (pretraining on preprocessed data needs only the model's vocabulary size)."""
    if data.tokenizer_type is None:
        return None
    return build_tokenizer(data.tokenizer_type, data.tokenizer_model)


DatasetsProvider = Callable[[JobConfig, int, int, Tokenizer | None], Datasets]
"""``fn(job, global_batch_size, train_iters, tokenizer) -> Datasets`` (`build_datasets`'s
signature), for `engine.training.pretrain`'s ``datasets_provider``."""


def build_datasets(
    job: JobConfig, global_batch_size: int, train_iters: int, tokenizer: Tokenizer | None
) -> Datasets:
    """Train, valid and test datasets sized for ``train_iters`` steps and the evaluations.

    Validation uses the same ``--eval-iters`` global batches every time, so successive
    evaluations are comparable (and resuming never shifts them).
    """
    if not job.data.data_path:
        raise ValueError("no training data: give --data-path")
    if job.data.sft:
        return _sft_datasets(job, tokenizer)
    config = GPTDatasetConfig(
        seq_length=job.training.seq_length,
        random_seed=job.training.seed,
        split=job.data.split,
        path_to_cache=job.data.data_cache_path,
        eod=None if tokenizer is None else tokenizer.eod,
        reset_position_ids=job.data.reset_position_ids,
        reset_attention_mask=job.data.reset_attention_mask,
        eod_mask_loss=job.data.eod_mask_loss,
        **_vocabulary(job, tokenizer),
    )
    eval_samples = job.training.eval_iters * global_batch_size
    sizes = (train_iters * global_batch_size, eval_samples or None, eval_samples or None)
    train, valid, test = build_blended_gpt_datasets(job.data.data_path, sizes, config)
    if train is None:
        raise ValueError(f"--split {job.data.split} leaves no training documents")
    return Datasets(train, valid, test, tokenizer)


def _vocabulary(job: JobConfig, tokenizer: Tokenizer | None) -> dict:
    """The ids the model embeds (the tokenizer's, as `TrainingRun` builds it, else
    ``--vocab-size``) and where that number comes from, for the datasets' id check."""
    if tokenizer is not None:
        model = job.data.tokenizer_model
        source = f"the tokenizer (--tokenizer-type {job.data.tokenizer_type}" + (
            f" --tokenizer-model {model})" if model else ")"
        )
        return {"vocab_size": tokenizer.vocab_size, "vocab_source": source}
    size = job.model.vocab_size
    return {"vocab_size": size, "vocab_source": f"the model (--vocab-size {size})"}


def _sft_datasets(job: JobConfig, tokenizer: Tokenizer | None) -> Datasets:
    """Packed SFT rows, split into train/valid/test by ``--split`` (contiguous ranges of the
    shuffled rows)."""
    path = job.data.data_path[-1]
    seq, seed = job.training.seq_length, job.training.seed
    if path.endswith(".jsonl"):
        if tokenizer is None:
            raise ValueError(f"--sft on {path} (JSONL) needs --tokenizer-type/--tokenizer-model")
        full = SFTDataset.from_jsonl(path, tokenizer, seq, job.data.chat_template, seed)
    else:
        pad = 0 if tokenizer is None or tokenizer.pad is None else tokenizer.pad
        full = SFTDataset.from_indexed(path, seq, seed, pad)
    weights = parse_split(job.data.split)
    bounds: list[float] = [0]
    for weight in weights:
        bounds.append(bounds[-1] + weight)
    edges = [int(round(b * len(full))) for b in bounds]
    parts = [
        torch.utils.data.Subset(full, range(lo, hi)) if hi > lo else None
        for lo, hi in zip(edges, edges[1:], strict=False)
    ]
    if parts[0] is None:
        raise ValueError(f"{path}: --split {job.data.split} leaves no training conversations")
    return Datasets(parts[0], parts[1], parts[2], tokenizer)


MODEL_INPUTS = ("tokens", "labels", "loss_mask", "position_ids")
DOCUMENT_IDS = "document_ids"
"""Packed documents (SFT rows, ``--reset-attention-mask``): the model attends within each."""


class _ModelInputs(torch.utils.data.Dataset):
    """The fields of each sample the model uses, with ``document_ids`` where the sample has
    them: SFT samples also carry the same boundaries as an ``[s, s]`` attention mask and as
    variable-length ``cu_seqlens``, which would be collated for nothing (or, for
    ``cu_seqlens``, not at all)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return dataset_length(self.dataset)

    def __getitem__(self, idx: int) -> Batch:
        sample = self.dataset[idx]
        keys = (*MODEL_INPUTS, DOCUMENT_IDS) if DOCUMENT_IDS in sample else MODEL_INPUTS
        return {key: sample[key] for key in keys}


def batch_iterator(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    device: torch.device,
    context_parallel: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """This rank's micro-batches from ``consumed_samples`` on, moved to ``device``.

    ``shuffle`` (SFT) draws epoch after epoch from seeded permutations; otherwise the
    (pre-shuffled) dataset is walked in order. ``context_parallel`` is this rank's (CP rank,
    CP size): every CP rank reads the same samples and keeps its chunks of each sequence
    (`engine.context_parallel.split_batch`); ``loss_tokens`` is the whole sequence's count
    of loss tokens, which the loss divides by.
    """
    loader = build_data_loader(
        _ModelInputs(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
        data_parallel_size, shuffle=shuffle, seed=seed, num_workers=num_workers,
    )  # fmt: skip
    # Starting a DataLoader iterator draws a worker seed from the global CPU generator;
    # without this fork, evaluations and resumes would shift the training RNG streams.
    with torch.random.fork_rng(devices=[]):
        batches = iter(loader)
    for batch in batches:
        batch = split_batch(batch, *context_parallel)
        yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def iterations_for(train_iters: int | None, train_samples: int | None, global_batch: int) -> int:
    """Optimizer steps of the run: ``--train-iters``, or ``--train-samples`` / global batch."""
    if train_iters is not None:
        return train_iters
    assert train_samples is not None
    return math.ceil(train_samples / global_batch)
