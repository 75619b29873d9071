"""Context parallelism: each sequence split over the CP group, attention across the split.

- `engine.context_parallel.split`: the load-balanced split (rank r holds chunks r and
  2·CP-1-r) of batches, positions and tensors;
- `engine.context_parallel.ring`: ring attention (``--cp-comm-type p2p``), from the block
  attention with log-sum-exp of `engine.context_parallel.blocks`;
- `engine.context_parallel.all_to_all`: Ulysses-style all-to-all (``--cp-comm-type a2a``).

Everything outside attention is per token, so it runs unchanged on the local chunks; the
process groups are `engine.parallel_state`'s (``get_context_parallel_group``). docs/
context_parallel.md explains the split, the traffic and when to use which.
"""

from engine.context_parallel.all_to_all import all_to_all_attention
from engine.context_parallel.blocks import BLOCK_BACKENDS, merge_block
from engine.context_parallel.ring import RingStep, ring_attention, ring_steps
from engine.context_parallel.split import (
    gather_order,
    local_positions,
    split_batch,
    split_sequence,
)

__all__ = [
    "BLOCK_BACKENDS",
    "RingStep",
    "all_to_all_attention",
    "gather_order",
    "local_positions",
    "merge_block",
    "ring_attention",
    "ring_steps",
    "split_batch",
    "split_sequence",
]
