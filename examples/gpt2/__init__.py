"""GPT-2 as a model family of its own, built from the engine's layers outside `engine/`: the
model (`model`), its parameter inventory (`inventory`) and its HuggingFace adapter (`hf`).

Importing the package registers the family "gpt2"; the trainer takes it with
``--model-provider examples.gpt2:GPT2``, and ``ModelConfig(..., family="gpt2")`` names it.
"""

from engine.models.families import ModelFamily, register_family
from examples.gpt2.hf import HF_ADAPTER
from examples.gpt2.inventory import (
    ARCHITECTURE_FLAGS,
    UNUSED_CONFIG_FIELDS,
    gpt2_flops_per_token,
    gpt2_inventory,
)
from examples.gpt2.model import GPT2Model

GPT2 = register_family(
    ModelFamily(
        name="gpt2",
        model=GPT2Model,
        inventory=gpt2_inventory,
        architecture_flags=ARCHITECTURE_FLAGS,
        hf=HF_ADAPTER,
        flops_per_token=gpt2_flops_per_token,
        unused_config_fields=UNUSED_CONFIG_FIELDS,
    )
)

__all__ = ["GPT2", "GPT2Model", "gpt2_inventory"]
