"""Perplexity of a checkpoint on a corpus, with a sliding window, at any TP / PP / DP layout.

Each document is scored on its own. A window of ``seq_length`` tokens moves by ``stride``;
every token but the document's first is predicted exactly once, from the window that first
reaches it, with up to ``seq_length - 1`` tokens of context (``stride == seq_length``:
disjoint windows; a smaller stride gives later tokens more context at the cost of more
forwards). This is the windowing of HuggingFace's perplexity guide, with each token scored
once. Perplexity is ``exp(sum NLL / tokens scored)``.

Every rank reads the same documents; windows are dealt to data-parallel ranks round robin;
pipeline stages pass hidden states point to point (`engine.pipeline_parallel.forward_only`,
the pass generation uses too); the last stage's TP rank 0 adds each window's token losses
(float32 from the vocab-parallel cross entropy, summed in float64) and one all-reduce gives
the total.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.data.indexed_dataset import IndexedDataset
from engine.data.tokenizer import Tokenizer
from engine.models.chunk import config_of
from engine.pipeline_parallel.forward_only import activation_spec, forward_only_pass


@dataclass
class Window:
    """One forward: ``tokens [begin, end)`` of a document; tokens at positions
    ``>= score_from`` (relative to ``begin``, at least 1) are scored."""

    document: int
    begin: int
    end: int
    score_from: int


@dataclass
class PerplexityResult:
    nll_sum: float
    """Sum of the scored tokens' negative log-likelihoods (nats)."""
    tokens: int
    """Tokens scored."""
    windows: int
    """Forwards run (over all ranks)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def sliding_windows(
    num_tokens: int, seq_length: int, stride: int, document: int = 0
) -> list[Window]:
    """The windows over one document of ``num_tokens`` tokens (none for fewer than 2)."""
    if not 0 < stride <= seq_length:
        raise ValueError(f"--stride ({stride}) must be in 1..--seq-length ({seq_length})")
    windows, scored_to = [], 1  # token 0 has no context: it is never scored
    begin = 0
    while scored_to < num_tokens:
        end = min(begin + seq_length, num_tokens)
        windows.append(Window(document, begin, end, scored_to - begin))
        scored_to = end
        begin += stride
    return windows


def read_documents(
    path: str | Path, tokenizer: Tokenizer | None, json_key: str = "text"
) -> list[list[int]]:
    """Token ids of every document: a ``.jsonl`` file (``json_key`` of each line, tokenized),
    or an indexed dataset prefix (``{path}.bin/.idx``, already tokenized)."""
    path = str(path)
    if IndexedDataset.exists(path):
        dataset = IndexedDataset(path)
        return [dataset.document(d).tolist() for d in range(dataset.num_documents)]
    if tokenizer is None:
        raise ValueError(f"{path} is JSONL text: give --tokenizer-type and --tokenizer-model")
    documents = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if json_key not in record:
                raise ValueError(f"{path}:{number} has no key {json_key!r} (--json-keys)")
            documents.append(tokenizer.tokenize(record[json_key]))
    return documents


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    documents: Sequence[Sequence[int]],
    seq_length: int,
    stride: int,
    micro_batch_size: int = 1,
    on_windows: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``documents`` (collective over every rank of the job). Up to
    ``micro_batch_size`` consecutive windows of the same length run as one batch;
    ``on_windows(done, total)`` follows this rank's windows (a progress display), called
    before the first batch and after each."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    windows = [
        w
        for d, doc in enumerate(documents)
        for w in sliding_windows(len(doc), seq_length, stride, d)
    ]
    device = next(model.parameters()).device
    nll, count = torch.zeros((), dtype=torch.float64), 0
    mine = windows[dp_rank::dp_size]
    done = 0
    if on_windows is not None:
        on_windows(done, len(mine))
    for batch in _batches(mine, micro_batch_size):
        tokens = torch.tensor(
            [documents[w.document][w.begin : w.end] for w in batch], device=device
        )
        loss = _window_losses(model, tokens[:, :-1], tokens[:, 1:])
        if loss is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            for row, window in zip(loss, batch, strict=True):
                # Input position i predicts token i + 1: scored targets start at score_from - 1.
                scored = row[window.score_from - 1 :]
                nll += scored.double().sum().cpu()
                count += scored.numel()
        done += len(batch)
        if on_windows is not None:
            on_windows(done, len(mine))
    totals = torch.tensor([nll.item(), float(count)], dtype=torch.float64)
    dist.all_reduce(totals)
    return PerplexityResult(totals[0].item(), int(totals[1].item()), len(windows))


def _batches(windows: list[Window], size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most ``size`` a batch (every rank of a
    pipeline computes the same batches, so the stages agree on the hidden states' shape)."""
    batches: list[list[Window]] = []
    for window in windows:
        last = batches[-1] if batches else None
        length = window.end - window.begin
        if last and len(last) < size and last[0].end - last[0].begin == length:
            last.append(window)
        else:
            batches.append([window])
    return batches


def _window_losses(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor | None:
    """Per-token losses ``[b, s]`` on the last stage (None elsewhere), by one forward-only
    pipeline pass (`engine.pipeline_parallel.forward_only`): stages pass hidden states
    ``[s, b, h]`` to the next one point to point."""
    last = parallel_state.is_pipeline_last_stage()
    b, s = input_ids.shape
    return forward_only_pass(
        lambda hidden: model(input_ids, labels=labels if last else None, decoder_input=hidden),
        activation_spec(model, (s, b, config_of(model).hidden_size)),
    )
