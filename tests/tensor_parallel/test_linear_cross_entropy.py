"""The chunked output layer + cross entropy (`engine.tensor_parallel.linear_cross_entropy`)
against the whole logits through `vocab_parallel_cross_entropy`, on real gloo ranks: losses and
the gradients of the input and of the output layer's weight within 1e-6, at TP=1 and TP=2
(with and without sequence parallelism), odd token counts, a vocabulary TP does not divide
(padding rows), chunks that do not divide the tokens; and no ``[tokens, V/tp]`` tensor kept for
backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import parallel_state
from engine.tensor_parallel import (
    IGNORE_INDEX,
    copy_to_tensor_model_parallel_region,
    linear_with_sequence_parallel_input,
    pad_vocab_size,
    vocab_parallel_cross_entropy,
)
from engine.tensor_parallel.linear_cross_entropy import default_chunk_size, linear_cross_entropy
from tests.rank_pool import module_pool

pool = module_pool(2)

VOCAB, HIDDEN = 1001, 32  # 1001 = 7 x 11 x 13: padded for every TP size


def both_paths(tp: int, seq: int, batch: int, chunk: int, sequence_parallel: bool,
               mean: bool = False) -> dict:  # fmt: skip
    """Both paths on the same data. ``mean``: the trainer's loss gradients (one value for
    every token, every third token's label `IGNORE_INDEX`), which the chunked path answers
    from its forward without recomputing; else random loss gradients, which it recomputes."""
    from engine.tensor_parallel import linear_cross_entropy as module

    recomputed: list[int] = []
    general = module._recomputed_gradients

    def counting(*args, **kwargs):
        recomputed.append(1)
        return general(*args, **kwargs)

    module._recomputed_gradients = counting
    parallel_state.initialize_model_parallel(tp)
    try:
        rank = parallel_state.get_tensor_model_parallel_rank()
        padded = pad_vocab_size(VOCAB, tp, 8)
        generator = torch.Generator().manual_seed(0)
        full_weight = torch.randn(padded, HIDDEN, generator=generator) * 0.3
        full_weight[VOCAB:] = 0.0  # padding rows, as the model initialises them
        x_full = torch.randn(seq, batch, HIDDEN, generator=generator)
        target = torch.randint(0, VOCAB, (seq, batch), generator=generator)
        grad_loss = torch.rand(seq, batch, generator=generator)
        if mean:
            target.view(-1)[::3] = IGNORE_INDEX
            grad_loss = torch.full((seq, batch), 0.37)
        shard = padded // tp
        weight = full_weight[rank * shard : (rank + 1) * shard].clone()
        local = seq // tp if sequence_parallel else seq
        x_in = x_full[rank * local : (rank + 1) * local] if sequence_parallel else x_full
        results = []
        for chunked in (False, True):
            x = x_in.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            saved: list[int] = []  # elements of each tensor kept for backward

            def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
                saved.append(t.numel())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if chunked:
                    loss = linear_cross_entropy(x, w, target, VOCAB, chunk, sequence_parallel)
                elif sequence_parallel:
                    logits = linear_with_sequence_parallel_input(x, w)
                    loss = vocab_parallel_cross_entropy(logits, target, VOCAB)
                else:
                    logits = F.linear(copy_to_tensor_model_parallel_region(x), w)
                    loss = vocab_parallel_cross_entropy(logits, target, VOCAB)
            loss.backward(grad_loss)
            results.append({"loss": loss.detach(), "dx": x.grad, "dw": w.grad, "saved": saved})
        return {"plain": results[0], "chunked": results[1], "shard": shard,
                "recomputed": len(recomputed)}  # fmt: skip
    finally:
        module._recomputed_gradients = general
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("mean", [False, True], ids=["any-gradients", "mean-loss"])
@pytest.mark.parametrize(
    "tp, seq, batch, chunk, sp",
    [(1, 13, 3, 5, False), (1, 13, 3, 64, False), (2, 13, 3, 4, False), (2, 14, 3, 5, True)],
    ids=["tp1", "tp1-one-chunk", "tp2", "tp2-sp"],
)
def test_chunked_equals_whole_logits(pool, tp, seq, batch, chunk, sp, mean):
    for rank, result in enumerate(pool.run(both_paths, tp, seq, batch, chunk, sp, mean)):
        plain, chunked = result["plain"], result["chunked"]
        assert result["recomputed"] == (0 if mean else 1), rank
        if mean:  # ignored tokens: loss 0 and no gradient
            assert (plain["loss"].view(-1)[::3] == 0).all()
        for key in ("loss", "dx", "dw"):
            torch.testing.assert_close(chunked[key], plain[key], rtol=1e-6, atol=1e-6,
                                       msg=f"rank {rank} {key}")  # fmt: skip
        # The plain path keeps the [tokens, V/tp] softmax; the chunked one nothing that large
        # (its largest: the weight or the input).
        logits = seq * batch * result["shard"]
        assert logits in plain["saved"]
        assert max(chunked["saved"]) <= max(result["shard"] * HIDDEN, seq * batch * HIDDEN)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        linear_cross_entropy(torch.zeros(2, 1, 4), torch.zeros(8, 4), torch.zeros(2, 1), 8, 0)


def model_paths(tp: int, overrides: dict, mean: bool) -> list[float]:
    """The largest difference, loss and every gradient, between the tiny LLaMA with the
    whole logits and with the chunked head (7 tokens a chunk, and the default chunks).
    ``mean``: the trainer's loss (the mean over a loss mask, masked labels ignored); else
    weights that differ per token."""
    from engine.models import LlamaModel, ModelConfig

    parallel_state.initialize_model_parallel(tp)
    try:
        tokens = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(1))
        labels, mask = tokens[:, 1:], torch.ones(3, 16)
        if mean:
            mask[:, :5] = 0  # a prompt without loss, as SFT's
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        weights = mask / mask.sum() if mean else torch.linspace(0, 1, 48).view(3, 16)
        runs = []
        for chunk in (0, 7, None):
            config = ModelConfig.from_preset("tiny", cross_entropy_chunk_size=chunk, **overrides)
            model = LlamaModel(config)
            loss = model(tokens[:, :-1], labels=labels)
            (loss * weights).sum().backward()
            runs.append([loss.detach()] + [p.grad for p in model.parameters()])
        return [(a - b).abs().max().item() for run in runs[1:]
                for a, b in zip(runs[0], run, strict=True)]  # fmt: skip
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("mean", [False, True], ids=["any-gradients", "mean-loss"])
@pytest.mark.parametrize(
    "tp, overrides",
    [(1, {}), (2, {"sequence_parallel": True, "tie_word_embeddings": True}), (2, {})],
    ids=["tp1", "tp2-sp-tied", "tp2"],
)
def test_the_model_with_a_chunked_head_equals_the_whole_logits(pool, tp, overrides, mean):
    for rank, errors in enumerate(pool.run(model_paths, tp, overrides, mean)):
        assert max(errors) < 1e-6, (rank, errors)


def test_the_default_chunks_hold_logits_about_the_size_of_the_input():
    """Liger's rule, at least 256 tokens a chunk; the whole logits when the vocabulary slice
    is no wider than the hidden size."""
    assert default_chunk_size(8192, 4096, 128256) == 512  # 8192 x 4096 / 128256 = 262
    assert default_chunk_size(2048, 512, 128256) == 256  # 9 wanted: too thin a GEMM
    assert default_chunk_size(100, 64, 256) == 100  # all the tokens, in one chunk
    assert default_chunk_size(4096, 4096, 4096) == 0  # TP=8 of 32,768 ids: the whole logits
