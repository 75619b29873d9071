"""Model families built from the engine's layers, their configuration and parameter
inventories; importing this package registers the built-in families (LLaMA, Mistral, Qwen2,
Qwen3)."""

from engine.models.config import PRESETS, ModelConfig
from engine.models.families import family_of, get_family, register_family
from engine.models.llama import LlamaModel
from engine.models.mistral import MISTRAL
from engine.models.qwen import QWEN2, QWEN3

__all__ = [
    "MISTRAL",
    "PRESETS",
    "QWEN2",
    "QWEN3",
    "LlamaModel",
    "ModelConfig",
    "family_of",
    "get_family",
    "register_family",
]
