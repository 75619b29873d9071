"""Tensor parallelism: communication ops, parallel layers, vocab-parallel cross entropy, and
the RNG streams and activation recomputation that go with them."""

from engine.tensor_parallel.attributes import mark_partial_over_tp
from engine.tensor_parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from engine.tensor_parallel.layers import (
    ColumnParallelLinear,
    InitMethod,
    RowParallelLinear,
    VocabParallelEmbedding,
    linear_with_sequence_parallel_input,
    normal_init,
    pad_vocab_size,
    vocab_padded_init,
)
from engine.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from engine.tensor_parallel.random import (
    MODEL_PARALLEL_RNG_NAME,
    RNGStatesTracker,
    checkpoint,
    get_rng_states,
    get_rng_tracker,
    model_parallel_seed,
    set_rng_states,
)

__all__ = [
    "IGNORE_INDEX",
    "MODEL_PARALLEL_RNG_NAME",
    "RNGStatesTracker",
    "checkpoint",
    "get_rng_states",
    "get_rng_tracker",
    "model_parallel_seed",
    "set_rng_states",
    "ColumnParallelLinear",
    "InitMethod",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tensor_model_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "linear_with_sequence_parallel_input",
    "mark_partial_over_tp",
    "normal_init",
    "pad_vocab_size",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "vocab_padded_init",
    "vocab_parallel_cross_entropy",
]
