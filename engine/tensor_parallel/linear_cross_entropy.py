"""The vocabulary-parallel output layer and cross entropy, over chunks of tokens.

The head's logits ``[s, b, V/tp]`` in float32, plus the softmax kept for backward, are often the
largest activation of a step: 2.1 GB per 4,096 tokens at LLaMA-3's 128,256-token vocabulary
(TP=1). Here the projection and the loss run ``chunk_size`` tokens at a time:

- forward: per chunk, logits = x_c Wᵀ (this rank's vocabulary slice), the vocab-parallel loss
  (`engine.tensor_parallel.cross_entropy`); only the per-token log-sum-exp is kept;
- backward: per chunk, the logits are recomputed, the softmax is rebuilt from the log-sum-exp,
  and ``dx_c = g W``, ``dW += gᵀ x_c`` with ``g = (softmax - onehot) · grad_loss``.

So at most one chunk's logits exist at a time, in forward and backward, at the cost of the head's
forward GEMM once more. The input arrives as the head's input ``[s(/tp), b, h]``: with sequence
parallelism the shard, all-gathered inside (forward and backward, as the sequence-parallel
linear does) so only the shard is kept; the input gradient is reduce-scattered (sequence
parallel) or all-reduced (the other TP ranks' vocabulary slices) over TP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import parallel_state
from engine.tensor_parallel.cross_entropy import (
    cross_entropy_terms,
    local_targets,
    mask_padding,
    softmax_grad_,
)
from engine.tensor_parallel.mappings import (
    all_gather_along_first_dim,
    reduce_scatter_along_first_dim,
)


def _chunks(rows: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, vocab_size, chunk_size, group, sequence_parallel):
        tp = dist.get_world_size(group)
        full = all_gather_along_first_dim(x, group) if sequence_parallel and tp > 1 else x
        hidden = full.reshape(-1, full.size(-1))  # [n, h], n = s·b
        targets = target.reshape(-1)
        loss = torch.empty(hidden.size(0), dtype=torch.float32, device=x.device)
        log_sum_exp = torch.empty_like(loss)
        for rows in _chunks(hidden.size(0), chunk_size):
            logits = F.linear(hidden[rows], weight).float()
            terms = cross_entropy_terms(logits, targets[rows], vocab_size, group)
            loss[rows], log_sum_exp[rows] = terms.loss, terms.log_sum_exp
        ctx.save_for_backward(x, weight, target, log_sum_exp)
        ctx.vocab_size, ctx.chunk_size = vocab_size, chunk_size
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, target, log_sum_exp = ctx.saved_tensors
        group, tp = ctx.group, dist.get_world_size(ctx.group)
        gather = ctx.sequence_parallel and tp > 1
        full = all_gather_along_first_dim(x, group) if gather else x
        hidden = full.reshape(-1, full.size(-1))
        targets, grads = target.reshape(-1), grad_loss.reshape(-1).float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a frozen head (a LoRA base) gets no weight gradient
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(hidden.size(0), ctx.chunk_size):
            logits = F.linear(hidden[rows], weight).float()
            mask_padding(logits, ctx.vocab_size, group)
            softmax = logits.sub_(log_sum_exp[rows].unsqueeze(-1)).exp_()
            local_target, outside = local_targets(targets[rows], logits.size(-1), group)
            grad_logits = softmax_grad_(softmax, local_target, outside, grads[rows])
            grad_logits = grad_logits.to(weight.dtype)
            grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().float(), hidden[rows].float())
        grad_full = grad_hidden.view(full.shape)
        if gather:
            grad_x = reduce_scatter_along_first_dim(grad_full, group)
        else:
            if tp > 1:  # each rank's vocabulary slice contributes to every token's gradient
                dist.all_reduce(grad_full, group=group)
            grad_x = grad_full
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int | None,
    chunk_size: int,
    sequence_parallel: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token cross entropy of ``x Wᵀ`` over a vocabulary split across TP, computed
    ``chunk_size`` tokens at a time (the module docstring says how).

    Args:
        x: ``[s, b, h]`` the head's input (``[s/tp, b, h]`` with ``sequence_parallel``).
        weight: ``[V_padded/tp, h]`` this rank's slice of the output layer.
        target: ``[s, b]`` token ids in the full vocabulary.
        vocab_size: the real vocabulary; entries past it are padding and take no probability.
        chunk_size: tokens (of ``s·b``) per chunk.

    Returns:
        ``[s, b]`` float32 losses, equal to `vocab_parallel_cross_entropy` of the whole logits.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return _LinearCrossEntropy.apply(
        x, weight, target, vocab_size, chunk_size, group, sequence_parallel
    )
