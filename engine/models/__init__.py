"""The LLaMA model family and its configuration."""

from engine.config import PRESETS, ModelConfig
from engine.models.llama import LlamaModel

__all__ = ["PRESETS", "LlamaModel", "ModelConfig"]
