"""The model contract (`engine.models.chunk`): what a chunk must expose, checked up front."""

from __future__ import annotations

import pytest
from torch import nn

from engine.models.chunk import ModelChunk, check_model_chunk


class Partial(nn.Module):
    """Has a config attribute and layers, nothing else the engine needs."""

    def __init__(self):
        super().__init__()
        self.config = None
        self.layers = nn.ModuleList()


def test_a_module_missing_pieces_of_the_contract_is_named():
    with pytest.raises(TypeError) as error:
        check_model_chunk(Partial())
    message = str(error.value)
    assert "Partial is not a model chunk: it lacks inventory, pre_process, post_process" in message
    assert "set_input_tensor(), shared_embedding_or_output_weight()" in message
    assert not isinstance(Partial(), ModelChunk)


def test_a_wrong_config_type_is_named():
    class NoConfig(Partial):
        inventory = pre_process = post_process = None

        def set_input_tensor(self, tensor):
            pass

        def shared_embedding_or_output_weight(self):
            return None

    with pytest.raises(TypeError, match="NoConfig is not a model chunk: it has no ModelConfig"):
        check_model_chunk(NoConfig())
