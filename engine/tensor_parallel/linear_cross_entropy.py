"""The vocabulary-parallel output layer and cross entropy, over chunks of tokens.

The head's logits ``[s, b, V/tp]`` in float32, plus the softmax kept for backward, are often the
largest activation of a step: 2.1 GB per 4,096 tokens at LLaMA-3's 128,256-token vocabulary
(TP=1). Here the projection and the loss run ``chunk_size`` tokens at a time:

- forward: per chunk, logits = x_c Wᵀ (this rank's vocabulary slice) and the vocab-parallel
  loss (`engine.tensor_parallel.cross_entropy`). When a gradient is wanted, the chunk's
  gradients for a loss gradient of 1 follow at once, as Liger's fused linear cross entropy
  does: ``g = softmax - onehot``, ``dx_c = g W``, ``dW += gᵀ x_c`` (float32);
- backward: the trainer's loss is the mean over the loss mask, so every token that counts
  (label not `IGNORE_INDEX`) gets the same gradient c, and the backward only scales the
  forward's ``dx`` and ``dW`` by c. Any other loss gradients (checked: they differ) take the
  general path: per chunk the logits are recomputed, the softmax rebuilt from the kept
  log-sum-exp, and ``g = (softmax - onehot) · grad_loss``.

So at most one chunk's logits exist at a time, and the head's GEMMs are the whole-logits path's
three (four on the general path). What is held from forward to backward is the input, ``dx``
and the float32 ``dW``: the weight's gradient, which the backward would allocate anyway. The
input arrives as the head's input ``[s(/tp), b, h]``: with sequence parallelism the shard,
all-gathered inside (forward, and backward on the general path) so only the shard is kept; the
input gradient is reduce-scattered (sequence parallel) or all-reduced (the other TP ranks'
vocabulary slices) over TP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine import parallel_state
from engine.tensor_parallel.cross_entropy import (
    IGNORE_INDEX,
    cross_entropy_terms,
    local_targets,
    mask_padding,
    softmax_grad_,
)
from engine.tensor_parallel.layers import ColumnParallelLinear
from engine.tensor_parallel.mappings import (
    all_gather_along_first_dim,
    reduce_scatter_along_first_dim,
)

MIN_CHUNK_TOKENS = 256
"""Fewer tokens a chunk make GEMMs too thin to run at speed (16-token chunks took 1.9 times the
whole logits' time on a CPU, 256-token ones 0.74 times)."""


def default_chunk_size(tokens: int, hidden: int, vocab_shard: int) -> int:
    """Tokens per chunk when none is given: a power of two whose logits ``[chunk, V/tp]`` are
    about the size of the head's input ``[tokens, h]`` (Liger's rule), so the head's working
    set stays that of its input, but at least `MIN_CHUNK_TOKENS` and at most all the tokens.
    0 (the whole logits) when the rule asks for one chunk: logits no wider than the input are
    no larger than what the chunked path holds instead (``dx`` and the float32 ``dW``)."""
    wanted = -(-tokens * hidden // vocab_shard)
    if wanted >= tokens:
        return 0
    return min(tokens, max(MIN_CHUNK_TOKENS, 1 << max(wanted - 1, 0).bit_length()))


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
        # The backward's GEMMs run here, so the backward need not recompute the logits.
        wanted = any(ctx.needs_input_grad[:2])
        ahead = _HeadGradients(hidden, weight, ctx.needs_input_grad[1]) if wanted else None
        chunk_logits = _ChunkLogits(weight, min(chunk_size, hidden.size(0)))
        for rows in _chunks(hidden.size(0), chunk_size):
            logits = chunk_logits(hidden[rows])
            terms = cross_entropy_terms(logits, targets[rows], vocab_size, group)
            loss[rows], log_sum_exp[rows] = terms.loss, terms.log_sum_exp
            if ahead is not None:
                ones = (targets[rows] != IGNORE_INDEX).float()
                grad_logits = softmax_grad_(
                    terms.exp_logits, terms.local_target, terms.outside, ones, terms.sum_exp
                )
                ahead.add(rows, grad_logits)
        ctx.save_for_backward(x, weight, target, log_sum_exp, *ahead.saved() if ahead else ())
        ctx.vocab_size, ctx.chunk_size = vocab_size, chunk_size
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, target, log_sum_exp, *ahead = ctx.saved_tensors
        group, tp = ctx.group, dist.get_world_size(ctx.group)
        gather = ctx.sequence_parallel and tp > 1
        targets, grads = target.reshape(-1), grad_loss.reshape(-1).float()
        counted = targets != IGNORE_INDEX
        scale = _common_gradient(grads, counted) if ahead else None
        if scale is not None:  # the forward's gradients, times the one gradient of every loss
            grad_full = ahead[0].mul_(scale).view(-1, *x.shape[1:])
            grad_weight = ahead[1].mul_(scale)
        else:
            full = all_gather_along_first_dim(x, group) if gather else x
            grad_full, grad_weight = _recomputed_gradients(
                full, weight, targets, log_sum_exp, grads * counted, ctx.vocab_size, ctx.chunk_size,
                group, ctx.needs_input_grad[1],
            )  # fmt: skip
        if gather:
            grad_x = reduce_scatter_along_first_dim(grad_full, group)
        else:
            if tp > 1:  # each rank's vocabulary slice contributes to every token's gradient
                dist.all_reduce(grad_full, group=group)
            grad_x = grad_full
        # A frozen head (a LoRA base) gets no weight gradient.
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None, None, None, None


class _ChunkLogits:
    """A chunk's float32 logits ``[rows, V/tp]`` in one buffer that every chunk reuses: on the
    CPU a fresh chunk of this size is a fresh mapping of pages (faulted in on first write) per
    chunk, and the GPU's caching allocator would reuse the same block anyway."""

    def __init__(self, weight: torch.Tensor, rows: int):
        self.weight = weight
        self.out = weight.new_empty(rows, weight.size(0))
        # A lower-precision head's GEMM output is copied to float32 for the loss's math.
        same = weight.dtype == torch.float32
        self.float32 = self.out if same else self.out.new_empty(self.out.shape, dtype=torch.float32)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[rows, h]`` (at most the buffer's rows) -> its logits, float32, in the
        buffer (valid until the next call)."""
        rows = hidden.size(0)
        out = torch.mm(hidden, self.weight.t(), out=self.out[:rows])
        return out if self.float32 is self.out else self.float32[:rows].copy_(out)


class _HeadGradients:
    """The head's gradients, accumulated chunk by chunk from each chunk's logits gradient
    ``g``: ``dx = g W`` per chunk and ``dW = Σ gᵀ x`` in float32 (empty when the weight is
    frozen). The forward fills them for a loss gradient of 1 on every token that is not
    ignored, and the backward only scales them when every such token's loss gets the same
    gradient (the trainer's mean over the loss mask: the masked tokens are ignored); the
    general path fills them from the recomputed logits."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, weight_grad: bool):
        self.hidden, self.weight = hidden, weight
        self.grad_hidden = torch.empty_like(hidden)
        shape = weight.shape if weight_grad else (0,)
        # Not zeroed: the first chunk's product is written, not added (no pass over [V/tp, h]).
        self.grad_weight = torch.empty(shape, dtype=torch.float32, device=weight.device)
        self.started = False

    def add(self, rows: slice, grad_logits: torch.Tensor) -> None:
        grad_logits = grad_logits.to(self.weight.dtype)
        torch.mm(grad_logits, self.weight, out=self.grad_hidden[rows])  # [rows, h]
        if self.grad_weight.numel():
            grad_t, hidden = grad_logits.t().float(), self.hidden[rows].float()
            if self.started:
                self.grad_weight.addmm_(grad_t, hidden)
            else:
                torch.mm(grad_t, hidden, out=self.grad_weight)
        self.started = True

    def saved(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.started:  # no tokens: nothing was written
            self.grad_weight.zero_()
        return self.grad_hidden, self.grad_weight


def _common_gradient(grads: torch.Tensor, counted: torch.Tensor) -> torch.Tensor | None:
    """The one gradient every counted token's loss has (0-d), or None when they differ."""
    mine = grads[counted]
    if mine.numel() == 0:
        return grads.new_zeros(())
    return mine[0] if torch.equal(mine, mine[:1].expand_as(mine)) else None


def _recomputed_gradients(
    full: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, log_sum_exp: torch.Tensor,
    grads: torch.Tensor, vocab_size: int | None, chunk_size: int, group: dist.ProcessGroup,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dx [n, h] in the input's shape, dW)`` for any loss gradients: each chunk's logits
    are recomputed and the softmax rebuilt from the log-sum-exp."""
    hidden = full.reshape(-1, full.size(-1))
    gradients = _HeadGradients(hidden, weight, weight_grad)
    chunk_logits = _ChunkLogits(weight, min(chunk_size, hidden.size(0)))
    for rows in _chunks(hidden.size(0), chunk_size):
        logits = chunk_logits(hidden[rows])
        mask_padding(logits, vocab_size, group)
        softmax = logits.sub_(log_sum_exp[rows].unsqueeze(-1)).exp_()
        local_target, outside = local_targets(targets[rows], logits.size(-1), group)
        gradients.add(rows, softmax_grad_(softmax, local_target, outside, grads[rows]))
    grad_hidden, grad_weight = gradients.saved()
    return grad_hidden.view(full.shape), grad_weight


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


class VocabParallelOutputLayer(ColumnParallelLinear):
    """The output head ``[V_padded/tp, h]``: logits as `ColumnParallelLinear`'s, or with
    ``labels`` the chunked per-token loss (`linear_cross_entropy`). The loss runs inside this
    module's forward, so the hooks on it run too: DDP's wait for the weight's all-gather
    (``--overlap-param-gather``) would otherwise not, and the head would read last step's
    weight."""

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        vocab_size: int | None = None,
        chunk_size: int = 0,
    ) -> torch.Tensor:
        """Logits ``[s, b, V/tp]``; with ``labels [s, b]`` and a ``chunk_size``, ``[s, b]``
        float32 losses. ``weight`` overrides the layer's own (a tied head's)."""
        if labels is None:
            return super().forward(x, weight)
        weight = self.weight if weight is None else weight
        return linear_cross_entropy(x, weight, labels, vocab_size, chunk_size,
                                    self.sequence_parallel)  # fmt: skip
