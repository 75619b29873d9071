"""Cross entropy over logits whose vocabulary is split across the TP group.

The full ``[tokens, vocab]`` logits are never gathered: each rank reduces its slice to a max,
a sum of exponentials and (on the rank that owns it) the target's logit, and three small
all-reduces of ``[tokens]`` tensors combine them. Entries past the real vocabulary (padding)
are set to -inf, so they can never win the max, take probability or carry gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine import parallel_state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        partition = logits.size(-1)
        start = rank * partition
        # A private float32 copy (the math below works in place on it).
        logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        target = target.contiguous()
        if vocab_size is not None and vocab_size < start + partition:
            logits[..., max(vocab_size - start, 0) :] = float("-inf")

        logits_max = logits.max(dim=-1).values
        if world > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits.sub_(logits_max.unsqueeze(-1))

        local_target = target - start
        outside = (local_target < 0) | (local_target >= partition)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)

        exp_logits = logits.exp_()
        sum_exp = exp_logits.sum(dim=-1)
        if world > 1:
            # One all-reduce for both sums.
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]
        loss = sum_exp.log() - target_logit

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax  # d loss / d logit = softmax - onehot(target); reuse the buffer
        rows = grad.view(-1, grad.size(-1))
        hit = (~outside).view(-1).to(grad.dtype)
        rows[torch.arange(rows.size(0), device=rows.device), local_target.view(-1)] -= hit
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token cross entropy of vocab-sharded logits, computed in float32.

    Args:
        logits: ``[*, padded_vocab/tp]``, this rank's slice of the (padded) vocabulary.
        target: ``[*]`` token ids in the full vocabulary.
        vocab_size: the real vocabulary size; entries at or past it are padding and ignored.
            ``None`` means no padding.
        group: the TP group (default: `engine.parallel_state`'s).

    Returns:
        ``[*]`` float32 losses (no reduction; apply the loss mask outside).

    The returned gradient w.r.t. ``logits`` is float32; autograd casts it to the logits' dtype.
    """
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, group)
