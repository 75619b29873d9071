"""GPT dataset: identical to Megatron-Core's GPTDataset, equal to a NumPy recomputation,
deterministic, cached once and memory-mapped, and safe when several ranks build at once."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from engine.data.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    build_gpt_datasets,
    ltor_masks_and_position_ids,
    split_ranges,
)
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tests.rank_pool import module_pool

EOD = 2


def make_corpus(prefix, num_docs=300, seed=0) -> list[np.ndarray]:
    """Documents of 1-80 random tokens, each ending in EOD, as the preprocessing tool writes."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(3, 1000, rng.integers(1, 80)), EOD) for _ in range(num_docs)]
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(f"{prefix}.idx")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("gpt") / "corpus"
    return str(prefix), make_corpus(prefix)


def config(tmp_path, **overrides) -> GPTDatasetConfig:
    settings = dict(seq_length=16, random_seed=7, eod=EOD, path_to_cache=str(tmp_path / "cache"))
    return GPTDatasetConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    "num_samples, options",
    [
        (None, {}),
        (500, {"create_attention_mask": True}),  # several epochs, last one separate
        (
            130,
            {
                "reset_position_ids": True,
                "reset_attention_mask": True,
                "eod_mask_loss": True,
                "create_attention_mask": True,
            },
        ),
        (40, {"add_extra_token_to_sequence": False}),
    ],
)
def test_identical_to_megatron_core(tmp_path, corpus, num_samples, options):
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MegatronConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    from megatron.core.datasets.utils import Split

    class Tokenizer:  # the fields Megatron's dataset reads from its tokenizer
        eod, pad, vocab_size = EOD, -1, 1000
        unique_identifiers = {"class": "fixed-eod"}

    prefix, _ = corpus
    flags = {"reset_position_ids": False, "reset_attention_mask": False, "eod_mask_loss": False}
    flags.update({"create_attention_mask": False, **options})
    theirs = MegatronGPTDataset(
        MegatronIndexed(prefix),
        prefix,
        np.arange(0, 290, dtype=np.int32),
        num_samples,
        Split.train,
        MegatronConfig(
            random_seed=7,
            sequence_length=16,
            split="1",
            tokenizer=Tokenizer(),
            path_to_cache=str(tmp_path / "megatron_cache"),
            **flags,
        ),
    )
    ours = GPTDataset(IndexedDataset(prefix), (0, 290), num_samples, config(tmp_path, **flags))
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name), err_msg=name)
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        # Our document ids are the attention mask's information in [seq] integers (what the
        # model masks with); Megatron-Core has only the mask.
        documents = a.pop("document_ids", None)
        assert (documents is not None) == flags["reset_attention_mask"]
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)
        if documents is not None:
            causal = torch.ones(16, 16, dtype=torch.bool).tril()
            same = documents[:, None] == documents[None, :]
            assert torch.equal(~(causal & same), b["attention_mask"][0]), i


def test_samples_equal_numpy_recomputation_and_cover_the_epoch(tmp_path, corpus):
    prefix, docs = corpus
    ds = GPTDataset(IndexedDataset(prefix), (10, 250), None, config(tmp_path))
    assert sorted(ds.document_index.tolist()) == list(range(10, 250))  # one epoch, each once
    stream = np.concatenate([docs[d] for d in ds.document_index])
    inverse = np.argsort(ds.shuffle_index)
    for j in range(len(ds)):  # j = position in the unshuffled stream
        sample = ds[int(inverse[j])]
        window = stream[j * 16 : j * 16 + 17]
        np.testing.assert_array_equal(sample["tokens"].numpy(), window[:-1])
        np.testing.assert_array_equal(sample["labels"].numpy(), window[1:])
        assert sample["position_ids"].tolist() == list(range(16))
        assert sample["loss_mask"].sum() == 16
    # Every token of the epoch is an input exactly once, up to the last partial sample.
    inputs = np.concatenate([ds[int(inverse[j])]["tokens"].numpy() for j in range(len(ds))])
    np.testing.assert_array_equal(inputs, stream[: len(ds) * 16])
    assert len(stream) - len(inputs) <= 16


def test_masks_match_megatron_function():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    rng = np.random.default_rng(3)
    for _ in range(20):
        tokens = torch.from_numpy(rng.choice([EOD, 5, 6, 7], 40, p=[0.15, 0.3, 0.3, 0.25]))
        for reset in (False, True):
            cfg = GPTDatasetConfig(
                seq_length=40,
                eod=EOD,
                reset_position_ids=reset,
                reset_attention_mask=reset,
                eod_mask_loss=reset,
                create_attention_mask=True,
            )
            ours = ltor_masks_and_position_ids(tokens, cfg)
            mask, loss_mask, positions = _get_ltor_masks_and_position_ids(
                tokens, EOD, reset, reset, reset, True
            )
            assert torch.equal(ours["attention_mask"], mask)
            assert torch.equal(ours["loss_mask"], loss_mask)
            assert torch.equal(ours["position_ids"], positions)


def test_deterministic_and_cached(tmp_path, corpus):
    prefix, _ = corpus
    first = GPTDataset(IndexedDataset(prefix), (0, 300), 200, config(tmp_path))
    assert first.built_cache
    again = GPTDataset(IndexedDataset(prefix), (0, 300), 200, config(tmp_path))
    assert not again.built_cache and isinstance(again.sample_index, np.memmap)
    elsewhere = GPTDataset(IndexedDataset(prefix), (0, 300), 200, config(tmp_path / "other"))
    for ds in (again, elsewhere):
        for i in (0, 57, 199):
            assert torch.equal(ds[i]["tokens"], first[i]["tokens"])
    other_seed = GPTDataset(IndexedDataset(prefix), (0, 300), 200, config(tmp_path, random_seed=8))
    assert not np.array_equal(other_seed.shuffle_index, first.shuffle_index)
    # Anything that changes the indices changes the cache key: no stale hit.
    longer = GPTDataset(IndexedDataset(prefix), (0, 300), 200, config(tmp_path, seq_length=24))
    assert longer.built_cache
    assert len(list((tmp_path / "cache").glob("*-sample_index.npy"))) == 3


def test_splits(tmp_path, corpus):
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("98,2", 100) == [(0, 98), (98, 100), None]
    prefix, _ = corpus
    train, valid, test = build_gpt_datasets(
        prefix, (100, 10, None), config(tmp_path, split="8,1,1")
    )
    assert set(train.document_index) == set(range(0, 240))
    assert set(valid.document_index) == set(range(240, 270))
    assert set(test.document_index) == set(range(270, 300))
    assert len(train) >= 100 and len(valid) >= 10  # whole epochs, as Megatron
    with pytest.raises(ValueError, match="--split 'a,b'"):
        split_ranges("a,b", 10)
    with pytest.raises(ValueError, match=r"document range \[5, 5\) is empty"):
        GPTDataset(IndexedDataset(prefix), (5, 5), 10, config(tmp_path))
    with pytest.raises(ValueError, match="need eod"):
        GPTDatasetConfig(seq_length=8, reset_position_ids=True)


def _build_on_rank(prefix: str, cache: str, distributed: bool) -> tuple[bool, str]:
    ds = GPTDataset(
        IndexedDataset(prefix),
        (0, 300),
        1000,
        GPTDatasetConfig(seq_length=8, random_seed=1, path_to_cache=cache),
        distributed=distributed,
    )
    digest = hashlib.sha256()
    for name in ("document_index", "sample_index", "shuffle_index"):
        digest.update(np.ascontiguousarray(getattr(ds, name)).tobytes())
    return ds.built_cache, digest.hexdigest()


pool = module_pool(4)


@pytest.mark.parametrize("distributed", [True, False])
def test_several_ranks_build_the_cache_once(tmp_path, corpus, pool, distributed):
    """distributed=True: rank 0 builds behind a barrier. False: all four race through the
    file lock at once. Either way one rank builds, the rest load the same arrays."""
    prefix, _ = corpus
    results = pool.run(_build_on_rank, prefix, str(tmp_path / "cache"), distributed)
    built = [b for b, _ in results]
    assert sum(built) == 1, built
    if distributed:
        assert built[0]
    assert len({digest for _, digest in results}) == 1
    files = sorted(os.listdir(tmp_path / "cache"))
    assert [f.split("-", 1)[1] for f in files] == [
        "GPTDataset-train-description.json",
        "GPTDataset-train-document_index.npy",
        "GPTDataset-train-lock",
        "GPTDataset-train-sample_index.npy",
        "GPTDataset-train-shuffle_index.npy",
    ]


def test_ids_the_model_cannot_embed_are_refused_as_the_dataset_opens(tmp_path, corpus):
    prefix, docs = corpus
    largest = max(int(doc.max()) for doc in docs)
    fits = config(tmp_path, vocab_size=largest + 1, vocab_source="the tokenizer (X)")
    assert build_gpt_datasets(prefix, (10, None, None), fits)[0] is not None
    # The largest id is computed once and cached beside the sample indices.
    [cached] = (tmp_path / "cache").glob("*-TokenRange-max_token_id.npy")
    assert int(np.load(cached)[0]) == largest
    small = config(tmp_path, vocab_size=largest, vocab_source="the tokenizer (X)")
    with pytest.raises(ValueError) as error:
        build_gpt_datasets(prefix, (10, None, None), small)
    message = str(error.value)
    assert f"{prefix}.bin" in message and f"token id {largest}" in message
    assert f"the tokenizer (X) has {largest} ids" in message


def test_the_largest_id_is_read_in_chunks(corpus):
    prefix, docs = corpus
    indexed = IndexedDataset(prefix)
    assert indexed.max_token_id(chunk_tokens=7) == max(int(doc.max()) for doc in docs)
