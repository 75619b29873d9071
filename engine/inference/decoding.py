"""Decoding as the tools expose it: the flags `tools/generate.py` and `tools/evaluate.py --task
generation` share, prompt text to ids and new ids back to text, and prompts decoded in batches.

Both tools call `add_decoding_flags` and `sampling_params`, so a flag means the same in each
and greedy outputs are the same text. Prompts are decoded ``--micro-batch-size`` at a time
(one left-padded batch each; a padded prompt decodes exactly as it would alone, see
`engine.inference.generation`); batch ``i`` samples with seed ``--seed + i``, so batches do
not repeat each other's draws. Data-parallel replicas deal the batches round robin and
`gather_replicas` merges their outputs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

import torch.distributed as dist
from torch import nn

from engine.data.tokenizer import Tokenizer
from engine.inference.generation import SamplingParams, TokenCallback, generate

DEFAULT_MICRO_BATCH_SIZE = 8
"""Prompts per `generate` call when ``--micro-batch-size`` is not given."""


def add_decoding_flags(
    parser: argparse.ArgumentParser, micro_batch_help: str | None = None
) -> None:
    """``--max-new-tokens --temperature --top-k --top-p --seed --ignore-eos --no-bos
    --micro-batch-size`` (Megatron's names; ``micro_batch_help`` words the last for the
    tool, whose default is None: the tool's own)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=64, help="tokens to decode at most")
    group.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    group.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    group.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    group.add_argument("--seed", type=int, default=1234, help="sampling seed (batch i: seed + i)")
    group.add_argument("--ignore-eos", action="store_true", help="always decode max tokens")
    group.add_argument("--no-bos", action="store_true", help="do not start prompts with BOS")
    group.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help=micro_batch_help or f"prompts per generate call (default {DEFAULT_MICRO_BATCH_SIZE})",
    )


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The `SamplingParams` of the decoding flags; ValueError naming the flag if one is out
    of range (check before loading a model)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens ({args.max_new_tokens}) must be at least 1")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size ({args.micro_batch_size}) must be at least 1")
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)


def encode(tokenizer: Tokenizer, text: str, add_bos: bool) -> list[int]:
    """Prompt ids, starting with BOS when asked (SentencePiece's `tokenize` adds none; a HF
    tokenizer's post-processor may already have)."""
    ids = tokenizer.tokenize(text)
    if add_bos and tokenizer.bos is not None and ids[:1] != [tokenizer.bos]:
        ids = [tokenizer.bos] + ids
    return ids


def completion(tokenizer: Tokenizer, prompt: Sequence[int], new: Sequence[int]) -> str:
    """The text ``new`` adds after ``prompt``: decoded in context, since pieces such as
    SentencePiece's word-initial spaces or multi-byte characters split over tokens only make
    sense after what precedes them."""
    before = tokenizer.detokenize(list(prompt))
    return tokenizer.detokenize(list(prompt) + list(new))[len(before) :]


def batch_size(args: argparse.Namespace) -> int:
    """Prompts per `generate` call: ``--micro-batch-size``, else `DEFAULT_MICRO_BATCH_SIZE`."""
    return args.micro_batch_size or DEFAULT_MICRO_BATCH_SIZE


def _batches(
    num_prompts: int, args: argparse.Namespace, replica: tuple[int, int]
) -> list[tuple[int, range]]:
    """``(batch number, its prompts)`` of the batches ``replica`` ``(r, n)`` decodes: numbers
    ``r, r + n, ...`` of the consecutive batches of `batch_size` prompts."""
    size = batch_size(args)
    rank, replicas = replica
    return [
        (number, range(start, min(start + size, num_prompts)))
        for number, start in enumerate(range(0, num_prompts, size))
        if number % replicas == rank
    ]


def decode_batches(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    args: argparse.Namespace,
    stops: Collection[int] | None,
    pad_id: int,
    on_tokens: Callable[[int, int], TokenCallback | None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    replica: tuple[int, int] = (0, 1),
) -> list[list[int]]:
    """The new ids of every prompt, `batch_size` prompts per `generate` call (collective:
    every model-parallel rank passes the same prompts).

    Args:
        stops: the ids that end a sequence (ignored with ``--ignore-eos``).
        on_tokens: ``fn(first prompt index, batch size)`` giving a batch's streaming callback.
        on_batch: ``fn(first prompt index, batch size)`` after each batch (progress).
        replica: ``(r, n)``: this model replica (data-parallel rank ``r`` of ``n``) decodes
            batches ``r, r + n, ...`` only, and the other prompts' entries stay empty
            (`gather_replicas` fills them). Batch ``i`` samples with ``--seed + i`` whoever
            decodes it, so the outputs do not depend on ``n``.
    """
    sampling = sampling_params(args)
    outputs: list[list[int]] = [[] for _ in prompts]
    for number, rows in _batches(len(prompts), args, replica):
        outputs[rows.start : rows.stop] = generate(
            model,
            prompts[rows.start : rows.stop],
            args.max_new_tokens,
            replace(sampling, seed=sampling.seed + number),
            eos_id=None if args.ignore_eos else stops,
            pad_id=pad_id,
            on_tokens=on_tokens(rows.start, len(rows)) if on_tokens is not None else None,
        )
        if on_batch is not None:
            on_batch(rows.start, len(rows))
    return outputs


def prompts_decoded_by(replica: tuple[int, int], num_prompts: int, args: argparse.Namespace) -> int:
    """How many of ``num_prompts`` prompts `decode_batches` decodes on ``replica``."""
    return sum(len(rows) for _, rows in _batches(num_prompts, args, replica))


def gather_replicas(
    outputs: list[list[int]], args: argparse.Namespace, group: dist.ProcessGroup | None = None
) -> list[list[int]] | None:
    """Every replica's `decode_batches` outputs merged, on the group's rank 0 (None on the
    others): each batch from the replica that decoded it (collective over ``group``, the
    data-parallel group)."""
    replicas = dist.get_world_size(group)
    if replicas == 1:
        return outputs
    gathered: list[Any] | None = [None] * replicas if dist.get_rank(group) == 0 else None
    dist.gather_object(outputs, gathered, group=group, group_dst=0)
    if gathered is None:
        return None
    merged = list(outputs)
    for replica, theirs in enumerate(gathered):
        for _, rows in _batches(len(outputs), args, (replica, replicas)):
            merged[rows.start : rows.stop] = theirs[rows.start : rows.stop]
    return merged
