"""Model families built from the engine's layers, their configuration and parameter
inventories; importing this package registers the built-in families (LLaMA)."""

from engine.models.config import PRESETS, ModelConfig
from engine.models.families import family_of, get_family, register_family
from engine.models.llama import LlamaModel

__all__ = ["PRESETS", "LlamaModel", "ModelConfig", "family_of", "get_family", "register_family"]
