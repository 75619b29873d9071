"""The GPT-2 family's parameters, declared once (see `engine.models.inventory`).

HF's GPT-2 keeps its projections in ``Conv1D`` layers, whose weights are stored ``[in, out]``:
the transpose of the engine's ``[out, in]`` (``hf_transposed``). Its fused ``c_attn`` holds
Q|K|V along the output dimension in one HF tensor, so the canonical tensor is the fused
``layers.{n}.attention.qkv.weight [3h, h]`` (one part); its three blocks are still split over
TP each on its own (``partition_sizes`` ``(h, h, h)``), so every rank holds whole heads of Q,
K and V. The learned position embedding is replicated; under sequence parallelism each TP rank
adds only the positions of its slice of the sequence, so its gradient is partial, as are
those of the LayerNorms and of the biases added after a row-parallel reduction.
"""

from __future__ import annotations

from engine.models.config import ModelConfig
from engine.models.flops import decoder_flops_per_token
from engine.models.inventory import CanonicalTensor, Inventory, ParameterSpec, Stage
from engine.tensor_parallel.layers import pad_vocab_size

ARCHITECTURE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "ffn_hidden_size": "--ffn-hidden-size",
    "vocab_size": "--vocab-size (the tokenizer's)",
    "max_position_embeddings": "--max-position-embeddings",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights",
}
"""The configuration fields that fix the parameters' shapes, with the flag that sets each."""

UNUSED_CONFIG_FIELDS = ("num_query_groups", "rotary_base", "norm_backend")
"""LLaMA's fields GPT-2 has no use for (multi-head attention, learned positions, LayerNorm):
their flags are errors with ``--model-provider examples.gpt2:GPT2``."""


def gpt2_flops_per_token(config: ModelConfig, seq_length: int) -> int:
    """The decoder's ``6·N + 12·L·h·s`` without the position embedding, a lookup."""
    position_embedding = config.max_position_embeddings * config.hidden_size
    return decoder_flops_per_token(config, seq_length) - 6 * position_embedding


def gpt2_inventory(config: ModelConfig, tp_size: int) -> Inventory:
    """Every parameter of a GPT-2 model laid out over ``tp_size`` TP ranks."""
    h, ffn, vocab = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    padded = pad_vocab_size(vocab, tp_size, config.make_vocab_size_divisible_by)
    sp = config.sequence_parallel
    layer, hf = "layers.{n}.", "transformer.h.{n}."
    specs: list[ParameterSpec] = []

    def add(
        name: str, shape: tuple[int, ...], hf_name: str, tp_dim: int | None = None,
        blocks: tuple[int, ...] | None = None, stage: Stage = "layer", transposed: bool = False,
        partial: bool = False, vocab_padded: bool = False, tied_to: str | None = None,
    ) -> None:  # fmt: skip
        tensor = CanonicalTensor(name, shape, hf_name, hf_transposed=transposed)
        full = (padded, h) if vocab_padded else shape
        if tp_dim is not None and blocks is None:
            blocks = (full[tp_dim],)  # one block: an unfused parameter
        specs.append(ParameterSpec(
            name, (tensor,), full, tp_dim, blocks or (), partial_grad_over_tp=partial,
            stage=stage, tied_to=tied_to, vocab_padded=vocab_padded,
        ))  # fmt: skip

    def norm(name: str, hf_name: str, stage: Stage = "layer") -> None:
        for kind in ("weight", "bias"):
            add(f"{name}.{kind}", (h,), f"{hf_name}.{kind}", stage=stage, partial=sp)

    def column(name: str, hf_name: str, blocks: tuple[int, ...]) -> None:
        rows = sum(blocks)
        add(f"{name}.weight", (rows, h), f"{hf_name}.weight", 0, blocks, transposed=True)
        add(f"{name}.bias", (rows,), f"{hf_name}.bias", 0, blocks)

    def row(name: str, hf_name: str, inputs: int) -> None:
        add(f"{name}.weight", (h, inputs), f"{hf_name}.weight", 1, transposed=True)
        add(f"{name}.bias", (h,), f"{hf_name}.bias", partial=sp)  # added after the reduction

    add("embedding.weight", (vocab, h), "transformer.wte.weight", 0, stage="first",
        vocab_padded=True)  # fmt: skip
    add("position_embedding.weight", (config.max_position_embeddings, h),
        "transformer.wpe.weight", stage="first", partial=sp)  # fmt: skip
    norm(layer + "input_norm", hf + "ln_1")
    column(layer + "attention.qkv", hf + "attn.c_attn", (h, h, h))
    row(layer + "attention.out", hf + "attn.c_proj", h)
    norm(layer + "post_attention_norm", hf + "ln_2")
    column(layer + "mlp.fc", hf + "mlp.c_fc", (ffn,))
    row(layer + "mlp.proj", hf + "mlp.c_proj", ffn)
    norm("final_norm", "transformer.ln_f", "last")
    tied = "embedding.weight" if config.tie_word_embeddings else None
    add("output_layer.weight", (vocab, h), "lm_head.weight", 0, stage="last", tied_to=tied,
        vocab_padded=True)  # fmt: skip
    return Inventory(tuple(specs), config.num_layers, tp_size)
