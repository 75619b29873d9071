"""The Qwen2 / Qwen2.5 and Qwen3 families: the LLaMA decoder with Q/K/V biases (Qwen2) or
per-head Q/K RMSNorm and a head width of its own (Qwen3), registered as "qwen2" and "qwen3".
Their architecture options are `ModelConfig` fields the shared inventory declares, so
checkpoints, resharding and conversion follow; only the HF class differs."""

import dataclasses

from engine.models.families import register_family
from engine.models.llama import LLAMA
from engine.models.llama.hf import HFDialect, hf_adapter

QWEN2_HF = HFDialect(
    "qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2Config", qkv_bias=True,
    sliding_window_flag="use_sliding_window",
)  # fmt: skip
QWEN3_HF = HFDialect(
    "qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3Config", qk_layernorm=True,
    sliding_window_flag="use_sliding_window",
)  # fmt: skip

# Meta's original format is LLaMA's only.
QWEN2 = register_family(
    dataclasses.replace(LLAMA, name="qwen2", hf=hf_adapter(QWEN2_HF), meta_reader=None)
)
QWEN3 = register_family(
    dataclasses.replace(LLAMA, name="qwen3", hf=hf_adapter(QWEN3_HF), meta_reader=None)
)

__all__ = ["QWEN2", "QWEN3"]
