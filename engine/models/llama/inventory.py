"""The LLaMA family's parameters, declared once (see `engine.models.inventory`).

HF and Meta names sit beside each canonical tensor, so conversion's name maps are read off
this table (torchtitan's ``from_hf_map``, stated as data). Both HF and the engine rotate
halves of each head, so weights map one to one; Meta's interleaved rotary convention is
handled by `engine.models.llama.meta`.
"""

from __future__ import annotations

from engine.models.config import ModelConfig
from engine.models.inventory import CanonicalTensor, Inventory, ParameterSpec, Stage
from engine.tensor_parallel.layers import pad_vocab_size

ARCHITECTURE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "ffn_hidden_size": "--ffn-hidden-size",
    "vocab_size": "--vocab-size (the tokenizer's)",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights",
    "kv_channels": "--kv-channels",
    "qkv_bias": "--add-qkv-bias",
    "qk_layernorm": "--qk-layernorm",
}
"""The configuration fields that fix the parameters' shapes, with the flag that sets each
(named when a checkpoint does not fit the model)."""


def llama_inventory(config: ModelConfig, tp_size: int) -> Inventory:
    """Every parameter of a LLaMA model laid out over ``tp_size`` TP ranks.

    K/V are fused with Q (one column-parallel Q|K|V) when there are at least as many K/V heads
    as TP ranks; otherwise Q is column-parallel alone and K|V is replicated, its gradient
    partial on each rank (each computes only the heads its queries use). Q/K/V biases
    (``qkv_bias``) follow their weights' layout; the per-head Q and K norms
    (``qk_layernorm``, ``[d]``) are replicated and every rank's heads add to their gradients.
    """
    h, d, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    q, kv = config.num_attention_heads * d, config.kv_heads * d
    vocab = config.vocab_size
    padded = pad_vocab_size(vocab, tp_size, config.make_vocab_size_divisible_by)
    hf, meta = "model.layers.{n}.", "layers.{n}."
    # Canonical name: (full shape, HF name, Meta name); {n} is the global layer number.
    table = {
        "embedding.weight": ((vocab, h), "model.embed_tokens.weight", "tok_embeddings.weight"),
        "layers.{n}.input_norm.weight": ((h,), hf + "input_layernorm.weight",
                                         meta + "attention_norm.weight"),
        "layers.{n}.attention.q.weight": ((q, h), hf + "self_attn.q_proj.weight",
                                          meta + "attention.wq.weight"),
        "layers.{n}.attention.k.weight": ((kv, h), hf + "self_attn.k_proj.weight",
                                          meta + "attention.wk.weight"),
        "layers.{n}.attention.v.weight": ((kv, h), hf + "self_attn.v_proj.weight",
                                          meta + "attention.wv.weight"),
        "layers.{n}.attention.q.bias": ((q,), hf + "self_attn.q_proj.bias", None),
        "layers.{n}.attention.k.bias": ((kv,), hf + "self_attn.k_proj.bias", None),
        "layers.{n}.attention.v.bias": ((kv,), hf + "self_attn.v_proj.bias", None),
        "layers.{n}.attention.q_norm.weight": ((d,), hf + "self_attn.q_norm.weight", None),
        "layers.{n}.attention.k_norm.weight": ((d,), hf + "self_attn.k_norm.weight", None),
        "layers.{n}.attention.out.weight": ((h, q), hf + "self_attn.o_proj.weight",
                                            meta + "attention.wo.weight"),
        "layers.{n}.post_attention_norm.weight": ((h,), hf + "post_attention_layernorm.weight",
                                                  meta + "ffn_norm.weight"),
        "layers.{n}.mlp.gate.weight": ((ffn, h), hf + "mlp.gate_proj.weight",
                                       meta + "feed_forward.w1.weight"),
        "layers.{n}.mlp.up.weight": ((ffn, h), hf + "mlp.up_proj.weight",
                                     meta + "feed_forward.w3.weight"),
        "layers.{n}.mlp.down.weight": ((h, ffn), hf + "mlp.down_proj.weight",
                                       meta + "feed_forward.w2.weight"),
        "final_norm.weight": ((h,), "model.norm.weight", "norm.weight"),
        "output_layer.weight": ((vocab, h), "lm_head.weight", "output.weight"),
    }  # fmt: skip
    t = {name: CanonicalTensor(name, *row) for name, row in table.items()}
    sp = config.sequence_parallel  # norms see a slice of the sequence: partial gradients

    def column(name: str, *parts: str) -> ParameterSpec:
        sizes = tuple(t[p].shape[0] for p in parts)
        shape = (sum(sizes), *t[parts[0]].shape[1:])  # a weight [rows, h] or a bias [rows]
        return ParameterSpec(name, tuple(t[p] for p in parts), shape, 0, sizes)

    def row(name: str) -> ParameterSpec:
        return ParameterSpec(name, (t[name],), t[name].shape, 1, (t[name].shape[1],))

    def norm(name: str, stage: Stage = "layer") -> ParameterSpec:
        return ParameterSpec(name, (t[name],), (h,), None, partial_grad_over_tp=sp, stage=stage)

    def vocabulary(name: str, stage: Stage, tied_to: str | None = None) -> ParameterSpec:
        return ParameterSpec(name, (t[name],), (padded, h), 0, (padded,), stage=stage,
                             tied_to=tied_to, vocab_padded=True)  # fmt: skip

    def replicated_kv(name: str, k: str, v: str) -> ParameterSpec:
        shape = (2 * kv, *t[k].shape[1:])
        return ParameterSpec(name, (t[k], t[v]), shape, None, partial_grad_over_tp=True)

    def qk_norm(name: str) -> ParameterSpec:
        return ParameterSpec(name, (t[name],), (d,), None, partial_grad_over_tp=True)

    kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
    a = "layers.{n}.attention."
    if config.kv_heads >= tp_size:
        attention = [column(f"{a}qkv.{k}", f"{a}q.{k}", f"{a}k.{k}", f"{a}v.{k}") for k in kinds]
    else:
        attention = [column(f"{a}q.{k}", f"{a}q.{k}") for k in kinds]
        attention += [replicated_kv(f"{a}kv.{k}", f"{a}k.{k}", f"{a}v.{k}") for k in kinds]
    if config.qk_layernorm:
        attention += [qk_norm("layers.{n}.attention.q_norm.weight"),
                      qk_norm("layers.{n}.attention.k_norm.weight")]  # fmt: skip
    specs = [
        vocabulary("embedding.weight", "first"),
        norm("layers.{n}.input_norm.weight"),
        *attention,
        row("layers.{n}.attention.out.weight"),
        norm("layers.{n}.post_attention_norm.weight"),
        column(
            "layers.{n}.mlp.gate_up.weight",
            "layers.{n}.mlp.gate.weight",
            "layers.{n}.mlp.up.weight",
        ),  # fmt: skip
        row("layers.{n}.mlp.down.weight"),
        norm("final_norm.weight", "last"),
        vocabulary(
            "output_layer.weight",
            "last",
            "embedding.weight" if config.tie_word_embeddings else None,
        ),  # fmt: skip
    ]
    return Inventory(tuple(specs), config.num_layers, tp_size)
