"""The LLaMA family: the model (`model`), its parameter inventory (`inventory`), HuggingFace
``config.json`` (`hf`) and Meta's original format (`meta`); registered as family "llama"."""

from engine.models.families import ModelFamily, register_family
from engine.models.llama.hf import HF_ADAPTER
from engine.models.llama.inventory import ARCHITECTURE_FLAGS, llama_inventory
from engine.models.llama.meta import MetaCheckpoint
from engine.models.llama.model import LlamaModel

LLAMA = register_family(
    ModelFamily(
        name="llama",
        model=LlamaModel,
        inventory=llama_inventory,
        architecture_flags=ARCHITECTURE_FLAGS,
        hf=HF_ADAPTER,
        meta_reader=MetaCheckpoint,
    )
)

__all__ = ["LLAMA", "LlamaModel", "llama_inventory"]
