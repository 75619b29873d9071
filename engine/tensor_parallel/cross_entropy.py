"""Cross entropy over logits whose vocabulary is split across the TP group.

The full ``[tokens, vocab]`` logits are never gathered: each rank reduces its slice to a max,
a sum of exponentials and (on the rank that owns it) the target's logit, and three small
all-reduces of ``[tokens]`` tensors combine them. Entries past the real vocabulary (padding)
are set to -inf, so they can never win the max, take probability or carry gradient.

A label of `IGNORE_INDEX` (PyTorch's and HF's -100) is a token without loss: 0, and no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from engine import parallel_state

IGNORE_INDEX = -100
"""The label of a token that has no loss (0) and no gradient, as ``F.cross_entropy``'s."""


def mask_padding(logits: torch.Tensor, vocab_size: int | None, group: dist.ProcessGroup) -> None:
    """Set this rank's padding entries (ids at or past ``vocab_size``) of float32 logits
    ``[*, V/tp]`` to -inf, in place."""
    partition = logits.size(-1)
    start = dist.get_rank(group) * partition
    if vocab_size is not None and vocab_size < start + partition:
        logits[..., max(vocab_size - start, 0) :] = float("-inf")


def local_targets(
    target: torch.Tensor, partition: int, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each target in this rank's slice, 0 where outside it; whether it is outside)."""
    local = target - dist.get_rank(group) * partition
    outside = (local < 0) | (local >= partition)
    return local.masked_fill(outside, 0), outside


class CrossEntropyTerms(NamedTuple):
    """What `cross_entropy_terms` computes for ``n`` tokens."""

    loss: torch.Tensor
    """``[n]`` per-token loss."""
    exp_logits: torch.Tensor
    """``[n, V/tp]`` ``exp(logit - max)``: the logits' storage, not yet normalised."""
    sum_exp: torch.Tensor
    """``[n]`` the sum of ``exp_logits`` over the whole vocabulary (all TP ranks)."""
    log_sum_exp: torch.Tensor
    """``[n]`` log-sum-exp of the logits over the whole vocabulary."""
    local_target: torch.Tensor
    """``[n]`` each target's index in this rank's slice (0 where outside it)."""
    outside: torch.Tensor
    """``[n]`` the target is not in this rank's slice."""


def cross_entropy_terms(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None, group: dist.ProcessGroup
) -> CrossEntropyTerms:
    """Per-token loss of float32 logits ``[n, V/tp]`` (which become ``exp_logits`` in place)
    and the statistics a backward needs; the caller normalises ``exp_logits`` into the
    softmax only if it keeps it."""
    world = dist.get_world_size(group)
    mask_padding(logits, vocab_size, group)
    logits_max = logits.amax(dim=-1)  # not max(): that also finds the argmax, several times slower
    if world > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(logits_max.unsqueeze(-1))

    local_target, outside = local_targets(target, logits.size(-1), group)
    target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    target_logit = target_logit.masked_fill(outside, 0.0)

    exp_logits = logits.exp_()
    sum_exp = exp_logits.sum(dim=-1)
    if world > 1:
        # One all-reduce for both sums.
        both = torch.stack([target_logit, sum_exp])
        dist.all_reduce(both, group=group)
        target_logit, sum_exp = both[0], both[1]
    log_sum_exp = sum_exp.log()
    loss = (log_sum_exp - target_logit).masked_fill(target == IGNORE_INDEX, 0.0)
    return CrossEntropyTerms(
        loss, exp_logits, sum_exp, log_sum_exp + logits_max,
        local_target, outside,
    )  # fmt: skip


def softmax_grad_(
    softmax: torch.Tensor, local_target: torch.Tensor, outside: torch.Tensor,
    grad_loss: torch.Tensor, sum_exp: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """d loss / d logits = (softmax - onehot(target)) · grad_loss, in place on ``softmax``
    ``[n, V/tp]`` (targets outside this rank's slice have no one-hot entry here).

    With ``sum_exp [n]``, ``softmax`` holds `CrossEntropyTerms.exp_logits`, not yet normalised:
    the normalisation and the loss gradient then take one pass over the logits, not two."""
    scale = grad_loss if sum_exp is None else grad_loss / sum_exp
    softmax.mul_(scale.unsqueeze(-1))
    rows = torch.arange(softmax.size(0), device=softmax.device)
    softmax[rows, local_target] -= grad_loss.masked_fill(outside, 0.0).to(softmax.dtype)
    return softmax


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        shape = target.shape
        # A private float32 copy (the math works in place on it), one row per token.
        rows = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        rows = rows.view(-1, rows.size(-1))
        terms = cross_entropy_terms(rows, target.reshape(-1), vocab_size, group)
        # Kept unnormalised: the backward normalises and applies the loss gradient in one pass.
        ctx.save_for_backward(
            terms.exp_logits, terms.sum_exp, terms.outside, terms.local_target, target
        )
        ctx.logits_shape = logits.shape
        return terms.loss.view(shape)

    @staticmethod
    def backward(ctx, grad_loss):
        exp_logits, sum_exp, outside, local_target, target = ctx.saved_tensors
        grads = grad_loss.reshape(-1).masked_fill(target.reshape(-1) == IGNORE_INDEX, 0.0)
        grad = softmax_grad_(exp_logits, local_target, outside, grads, sum_exp)
        return grad.view(ctx.logits_shape), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token cross entropy of vocab-sharded logits, computed in float32.

    Args:
        logits: ``[*, padded_vocab/tp]``, this rank's slice of the (padded) vocabulary.
        target: ``[*]`` token ids in the full vocabulary, or `IGNORE_INDEX` (loss 0).
        vocab_size: the real vocabulary size; entries at or past it are padding and ignored.
            ``None`` means no padding.
        group: the TP group (default: `engine.parallel_state`'s).

    Returns:
        ``[*]`` float32 losses (no reduction; apply the loss mask outside).

    The returned gradient w.r.t. ``logits`` is float32; autograd casts it to the logits' dtype.
    """
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, group)
