"""This rank's model chunks, built for the current parallel state."""

from __future__ import annotations

from engine import parallel_state
from engine.models.config import ModelConfig
from engine.models.llama.model import LlamaModel
from engine.models.stage import chunk_layer_numbers


def build_model_chunks(config: ModelConfig) -> list[LlamaModel]:
    """This rank's model chunks, one per virtual stage (a list of one without interleaving),
    in chunk order.

    Sets the virtual pipeline rank while building each chunk, so that chunk 0 of the first
    rank gets the embedding and the last chunk of the last rank the output head, and leaves it
    at 0.
    """
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for chunk in range(v or 1):
        if v is not None:
            parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)
        chunks.append(LlamaModel(config, layer_numbers=chunk_layer_numbers(config)))
    if v is not None:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks
