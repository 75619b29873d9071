"""The LLaMA family: the model (`model`), HuggingFace names (`hf`), Meta's original format
(`meta`)."""

from engine.models.llama.model import LlamaModel

__all__ = ["LlamaModel"]
