"""Parameter-efficient fine-tuning: LoRA adapters on the tensor-parallel layers
(`engine.peft.lora`), configured by `LoraConfig` (`engine.peft.config`)."""

from engine.peft.config import LoraConfig
from engine.peft.lora import (
    apply_lora,
    is_lora_parameter,
    load_lora_state,
    lora_state,
    merge_lora,
)

__all__ = [
    "LoraConfig",
    "apply_lora",
    "is_lora_parameter",
    "load_lora_state",
    "lora_state",
    "merge_lora",
]
