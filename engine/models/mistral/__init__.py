"""The Mistral family (7B v0.3): the LLaMA decoder under Mistral's HF class, registered as
"mistral". Its sliding-window attention (v0.1) is refused on conversion: the engine's
attention is full causal."""

import dataclasses

from engine.models.families import register_family
from engine.models.llama import LLAMA
from engine.models.llama.hf import HFDialect, hf_adapter

MISTRAL_HF = HFDialect("mistral", "mistral", "MistralForCausalLM", "MistralConfig")

MISTRAL = register_family(
    dataclasses.replace(LLAMA, name="mistral", hf=hf_adapter(MISTRAL_HF), meta_reader=None)
)

__all__ = ["MISTRAL"]
