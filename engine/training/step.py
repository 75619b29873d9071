"""The training forward step: one microbatch through one model chunk, and its loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from engine import parallel_state
from engine.tensor_parallel import IGNORE_INDEX
from engine.training.data import Batch
from engine.wrappers import unwrap


def forward_step(
    data_iterator: Iterator[Batch], model: nn.Module
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """One microbatch through one model chunk (the schedules' ``forward_step_func``).

    Every chunk reads the batch (so all chunks' iterators stay in step); the first stage uses
    the tokens, the last the labels and loss mask. The loss of a microbatch is the mean of its
    per-token losses over the loss mask (what Megatron's GPT loss is).

    Under context parallelism a rank sees its chunks of each sequence only: it divides its
    share of the sum by the whole sequence's ``loss_tokens`` and multiplies by CP, because
    the gradients are averaged over DP x CP; the CP ranks' losses then average to the
    microbatch's.
    """
    batch = next(data_iterator)
    inner = unwrap(model)
    # Packed documents (SFT, --reset-attention-mask): attention stays inside each one.
    docs = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}
    mask = batch["loss_mask"].float()
    # Masked tokens' labels are IGNORE_INDEX: the chunked head then knows every other token's
    # loss gets the same gradient, and computes the gradients in its forward.
    labels = batch["labels"].masked_fill(mask == 0, IGNORE_INDEX) if inner.post_process else None
    output = model(
        batch["tokens"] if inner.pre_process else None,
        position_ids=batch["position_ids"],
        labels=labels,
        **docs,
    )
    tokens = batch["loss_tokens"].float() if "loss_tokens" in batch else mask.sum()
    cp = parallel_state.get_context_parallel_world_size()

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A row with no loss tokens (possible in SFT) gives 0, not 0/0.
        loss = (per_token.float() * mask).sum() * cp / tokens.clamp(min=1.0)
        return loss, loss.detach()

    return output, loss_func
