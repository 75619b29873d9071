"""The global gradient L2 norm across TP, PP and DP, and clipping by it.

Each rank sums the squares of the gradients it is responsible for, and one all-reduce adds
the partial sums. To count every model parameter exactly once:

- a parameter replicated over TP (norm weights, anything without ``tensor_model_parallel``)
  is counted on TP rank 0 only;
- the copy of a tied embedding kept by the last pipeline stage carries ``shared = True``
  (Megatron's marker) and is not counted; the first stage counts the embedding;
- with replicated optimizer state every DP rank holds the same (all-reduced) gradients, so the
  sum runs over the model-parallel (TP x PP) group only; with the distributed optimizer each
  DP rank holds a disjoint shard, and the sum also runs over the DP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.tensor_parallel.attributes import is_tensor_parallel


def counts_in_grad_norm(param: nn.Parameter) -> bool:
    """True when this rank counts ``param`` in the global norm (see the module docstring)."""
    if getattr(param, "shared", False):
        return False
    if is_tensor_parallel(param):
        return True
    return parallel_state.get_tensor_model_parallel_rank() == 0


def all_reduce_over(
    tensor: torch.Tensor,
    groups: list[dist.ProcessGroup],
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """All-reduce ``tensor`` in place over each group in turn (orthogonal groups compose)."""
    for group in groups:
        if dist.get_world_size(group) > 1:
            dist.all_reduce(tensor, op=op, group=group)
    return tensor


def get_grad_norm_fp32(grads: list[torch.Tensor], groups: list[dist.ProcessGroup]) -> float:
    """Global L2 norm of ``grads`` (this rank's share, any shapes), summed over ``groups``.

    Squares are summed in float32 (float64 would not change the result at these sizes and
    costs more); the result is a Python float, inf/nan when any gradient is not finite.
    """
    device = grads[0].device if grads else torch.device("cpu")
    if grads:
        norms = torch._foreach_norm([g.float() for g in grads], 2.0)
        total = torch.stack(norms).square().sum()
    else:
        total = torch.zeros((), device=device)
    total = all_reduce_over(total.reshape(1).float(), groups)
    return total.sqrt().item()


def clip_grads_by_total_norm(grads: list[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale ``grads`` in place so their global norm is at most ``max_norm``."""
    coeff = max_norm / (total_norm + 1.0e-6)  # the epsilon keeps a zero norm harmless
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)
