"""Autoregressive decoding with a preallocated KV cache, under tensor and pipeline parallelism.

One call to `generate` is collective over the model-parallel group (every TP rank of every
pipeline stage, all given the same prompts):

- Prompts of different lengths are left-padded to the longest; a boolean mask hides the pad
  tokens from every query, and each sequence's positions count only its real tokens, so a
  padded prompt decodes exactly as it would alone (HF's convention too).
- The first step runs the whole padded prompt (prefill), then one token per step. Each rank's
  `KVCache` holds the K/V heads of its own layers and TP shard.
- Pipeline stages pass hidden states ``[s, b, h]`` to the next stage point to point
  (`engine.pipeline_parallel.forward_only`, the pass evaluation uses too). The last stage
  gathers the vocab-parallel logits into the full vocabulary (padding rows dropped) and
  samples; TP rank 0's choice is broadcast to its TP group and then from the last stage back
  along the pipeline, so every rank holds the same tokens.
- Greedy, temperature, top-k and top-p sampling draw from a generator seeded by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.models.chunk import config_of
from engine.models.kv_cache import KVCache
from engine.pipeline_parallel.forward_only import activation_spec, forward_only_pass
from engine.tensor_parallel import gather_from_tensor_model_parallel_region

TokenCallback = Callable[[torch.Tensor, torch.Tensor], None]
"""``fn(tokens [b], finished [b])`` after every step, on every rank (streaming)."""


@dataclass
class SamplingParams:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0
    """0 is greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches p (1: all)."""
    seed: int = 0
    """Seed of the sampling generator (the same on every rank)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature ({self.temperature}) must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k ({self.top_k}) must be >= 0 (0: no filter)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p ({self.top_p}) must be in (0, 1] (1: no filter)")


@torch.no_grad()
def forward_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    kv_cache: KVCache | None = None,
) -> torch.Tensor | None:
    """Full-vocabulary logits of one forward through the pipeline (collective over the
    model-parallel group), by `engine.pipeline_parallel.forward_only.forward_only_pass`.

    Args:
        input_ids: ``[b, s]`` (read on the first stage).
        position_ids: ``[b, s]`` absolute positions.
        kv_cache: attend over (and extend) the cached prefix; None runs the plain causal
            forward of training, which is what cached decoding is tested against.

    Returns:
        Full-vocabulary float32 logits ``[b, s, vocab_size]`` on the last stage (every TP rank),
        None on the other stages.
    """
    b, s = input_ids.shape
    output = forward_only_pass(
        lambda hidden: model(
            input_ids, position_ids=position_ids, decoder_input=hidden, kv_cache=kv_cache
        ),
        activation_spec(model, (s, b, config_of(model).hidden_size)),
    )
    if output is None:
        return None
    # The vocabulary padding rows are dropped, so no padded entry can ever be sampled.
    logits = gather_from_tensor_model_parallel_region(output)
    return logits[..., : config_of(model).vocab_size].float()


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next tokens ``[b]`` from logits ``[b, V]`` (float32)."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def left_pad(
    prompts: Sequence[Sequence[int]], total_len: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest, in buffers of ``total_len`` positions.

    Returns:
        tokens ``[b, total_len]`` (pad after the prompts too), valid ``[b, total_len]`` (True
        for prompt tokens and every position after the prompts), position_ids
        ``[b, total_len]`` (counting real tokens only, 0 on the padding).
    """
    prompt_len = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), total_len), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), total_len, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        start = prompt_len - len(prompt)
        tokens[row, start:prompt_len] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, start:] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return tokens, valid, positions


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_id: int | Collection[int] | None = None,
    pad_id: int = 0,
    on_tokens: TokenCallback | None = None,
) -> list[list[int]]:
    """Continue every prompt by up to ``max_new_tokens`` tokens (collective over the
    model-parallel group; every rank passes the same arguments and gets the same result).

    A sequence stops after emitting ``eos_id``, or any id of it when it is a collection (a chat
    model's EOS and end-of-turn ids); the stopping id is included in its output. Decoding stops
    when every sequence has stopped or after ``max_new_tokens`` steps.

    Returns:
        The new tokens of each prompt (without the prompt).
    """
    if config_of(model).sequence_parallel:
        raise ValueError(
            "decoding runs one token at a time: build the model without --sequence-parallel"
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    sampling = sampling or SamplingParams()
    model.eval()
    device = next(model.parameters()).device
    prompt_len = max(len(p) for p in prompts)
    total_len = prompt_len + max_new_tokens
    if total_len > config_of(model).max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt_len}) + --max-new-tokens ({max_new_tokens}) exceeds "
            f"max_position_embeddings ({config_of(model).max_position_embeddings})"
        )
    stops = sorted({eos_id} if isinstance(eos_id, int) else set(eos_id or ()))
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    tokens, valid, positions = left_pad(prompts, total_len, pad_id, device)
    cache = KVCache(model, len(prompts), total_len, device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    begin, end = 0, prompt_len
    for _ in range(max_new_tokens):
        cache.prepare(valid[:, begin:end])
        logits = forward_logits(model, tokens[:, begin:end], positions[:, begin:end], cache)
        cache.advance()
        next_tokens = torch.empty(len(prompts), dtype=torch.long, device=device)
        if logits is not None:
            next_tokens = sample(logits[:, -1], sampling, generator)
        share_from_last_stage(next_tokens)
        # Finished sequences keep emitting pad (as HF's generate), never shown to the caller.
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        tokens[:, end] = next_tokens
        if stops:
            finished |= torch.isin(next_tokens, stop_ids)
        if on_tokens is not None:
            on_tokens(next_tokens, finished)
        begin, end = end, end + 1
        if bool(finished.all()):
            break
    return [_until_stop(row[prompt_len:end].tolist(), stops) for row in tokens]


def share_from_last_stage(tensor: torch.Tensor) -> None:
    """Make ``tensor`` that of the last stage's TP rank 0, on every model-parallel rank.

    TP ranks already agree (identical gathered logits, identical generator); the broadcast
    makes it hold even if a reduction order ever differed between them. The other stages
    pass an empty tensor of the same shape and dtype.
    """
    if parallel_state.is_pipeline_last_stage() and (
        parallel_state.get_tensor_model_parallel_world_size() > 1
    ):
        dist.broadcast(tensor, group=parallel_state.get_tensor_model_parallel_group(),
                       group_src=0)  # fmt: skip
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1:
        dist.broadcast(tensor, group=parallel_state.get_pipeline_model_parallel_group(),
                       group_src=pp - 1)  # fmt: skip


def _until_stop(tokens: list[int], stops: Collection[int]) -> list[int]:
    """`tokens` up to and including the first stop id."""
    for at, token in enumerate(tokens):
        if token in stops:
            return tokens[: at + 1]
    return tokens
