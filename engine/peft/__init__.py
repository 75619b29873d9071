"""Parameter-efficient fine-tuning: LoRA adapters on the tensor-parallel layers
(`engine.peft.lora`), configured by `LoraConfig` (`engine.peft.config`), saved and read as
HuggingFace PEFT adapter directories (`engine.peft.interop`)."""

from engine.peft.config import LoraConfig
from engine.peft.interop import read_peft_adapter, save_peft_adapter
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
    "read_peft_adapter",
    "save_peft_adapter",
]
