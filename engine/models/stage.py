"""Which layers this rank's current model chunk holds, from the parallel state."""

from __future__ import annotations

from engine import parallel_state
from engine.models.config import ModelConfig


def chunk_layer_numbers(config: ModelConfig, virtual_rank: int | None = None) -> list[int]:
    """The layers of this rank's current model chunk (layout read from `parallel_state`, the
    uneven split, if any, from ``config``).

    ``virtual_rank`` defaults to the virtual pipeline rank set in `parallel_state` (0 without
    interleaving).
    """
    p = parallel_state.get_pipeline_model_parallel_world_size()
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if virtual_rank is None:
        virtual_rank = parallel_state.get_virtual_pipeline_model_parallel_rank() or 0
    stages = config.virtual_stage_layers(p, v)
    return stages[virtual_rank * p + parallel_state.get_pipeline_model_parallel_rank()]
