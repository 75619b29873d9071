"""Small engine checkpoints for the inference tests: a random `transformers` LLaMA with the
LLaMA-2 vocabulary (local config, no download), saved with the shared SentencePiece model
beside it and converted with `engine.conversion.convert.hf_to_engine`, so the checkpoint
records its tokenizer and the tools need no tokenizer flags."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from tests.paths import SHARED_DATA

TOKENIZER = SHARED_DATA / "llama2-tokenizer.model"
"""The LLaMA-2 SentencePiece model (tests needing it skip without it)."""


def random_llama(lm_head_scale: float = 1.0) -> Any:
    """A seeded random `LlamaForCausalLM` (2 layers, h = 64, GQA 4/2 heads, 32,000 tokens,
    256 positions); ``lm_head_scale`` > 1 sharpens its near-uniform predictions."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )).eval()  # fmt: skip
    if lm_head_scale != 1.0:
        with torch.no_grad():
            hf.lm_head.weight.mul_(lm_head_scale)
    return hf


def converted_checkpoint(
    directory: Path, tp_size: int = 1, lm_head_scale: float = 1.0
) -> tuple[Path, Any]:
    """``(engine checkpoint at TP = tp_size, the HF model)``: `random_llama` saved to
    ``directory/hf`` with the tokenizer, converted to ``directory/engine``."""
    from engine.conversion.convert import hf_to_engine

    hf = random_llama(lm_head_scale)
    hf.save_pretrained(directory / "hf")
    shutil.copyfile(TOKENIZER, directory / "hf" / "tokenizer.model")  # the checkpoint records it
    hf_to_engine(directory / "hf", directory / "engine", tp_size=tp_size)
    return directory / "engine", hf
