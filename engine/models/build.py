"""This rank's model chunks, built for the current parallel state."""

from __future__ import annotations

from torch import nn

from engine import parallel_state
from engine.models.chunk import check_model_chunk
from engine.models.config import ModelConfig
from engine.models.families import family_of
from engine.models.stage import chunk_layer_numbers


def build_model_chunks(config: ModelConfig) -> list[nn.Module]:
    """This rank's model chunks (built by ``config``'s family), one per virtual stage (a list
    of one without interleaving), in chunk order.

    Sets the virtual pipeline rank while building each chunk, so that chunk 0 of the first
    rank gets the embedding and the last chunk of the last rank the output head, and leaves it
    at 0.
    """
    build = family_of(config).model
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for chunk in range(v or 1):
        if v is not None:
            parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)
        chunks.append(build(config, layer_numbers=chunk_layer_numbers(config)))
        check_model_chunk(chunks[-1])
    if v is not None:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks
