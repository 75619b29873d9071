"""The LLaMA model family and its configuration."""

from engine.models.config import PRESETS, ModelConfig
from engine.models.llama.model import LlamaModel

__all__ = ["PRESETS", "LlamaModel", "ModelConfig"]
