"""Model families defined outside the engine, for `--model-provider` and the trainer's
``model_provider`` (imported by name: ``tests.training.providers:OUT_BIAS``)."""

from __future__ import annotations

import dataclasses

from engine.models import get_family
from engine.models.config import ModelConfig
from engine.models.inventory import CanonicalTensor, Inventory, ParameterSpec
from engine.models.llama.inventory import llama_inventory


def with_out_bias(config: ModelConfig, tp_size: int) -> Inventory:
    """LLaMA's inventory plus a bias on the attention output projection."""
    base = llama_inventory(config, tp_size)
    h = config.hidden_size
    tensor = CanonicalTensor(
        "layers.{n}.attention.out.bias", (h,), "model.layers.{n}.self_attn.o_proj.bias"
    )
    bias = ParameterSpec(
        tensor.name, (tensor,), (h,), None, partial_grad_over_tp=config.sequence_parallel
    )
    specs = list(base.specs)
    at = next(i for i, s in enumerate(specs) if s.name == "layers.{n}.attention.out.weight")
    specs.insert(at + 1, bias)
    return dataclasses.replace(base, specs=tuple(specs))


OUT_BIAS = dataclasses.replace(
    get_family("llama"),
    name="llama-out-bias",
    inventory=with_out_bias,
    unused_config_fields=("rotary_base",),  # as if it had no rotary embedding
)


def make_out_bias():
    """A provider may also be a callable that returns the family."""
    return OUT_BIAS


NOT_A_FAMILY = 3
