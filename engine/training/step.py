"""The training forward step: one microbatch through one model chunk, and its loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from engine.training.data import Batch
from engine.wrappers import unwrap


def forward_step(
    data_iterator: Iterator[Batch], model: nn.Module
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """One microbatch through one model chunk (the schedules' ``forward_step_func``).

    Every chunk reads the batch (so all chunks' iterators stay in step); the first stage uses
    the tokens, the last the labels and loss mask. The loss of a microbatch is the mean of its
    per-token losses over the loss mask (what Megatron's GPT loss is).
    """
    batch = next(data_iterator)
    inner = unwrap(model)
    output = model(
        batch["tokens"] if inner.pre_process else None,
        position_ids=batch["position_ids"],
        labels=batch["labels"] if inner.post_process else None,
    )
    mask = batch["loss_mask"].float()

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A row with no loss tokens (possible in SFT) gives 0, not 0/0.
        loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, loss.detach()

    return output, loss_func
