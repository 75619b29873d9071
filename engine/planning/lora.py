"""What LoRA adds to a rank, by arithmetic alone: adapter parameters and their activations.

Read off the model's parameter inventory and the `LoraConfig`, with the placement of
`engine.peft.lora` (docs/lora.md): each targeted block (HF module) of a decoder layer's
weight ``W [out, in]`` gets ``A [r, in]`` and ``B [out, r]``, and on one TP rank

- column-parallel (``qkv``, ``q``, ``gate_up``; the spec splits dim 0): A replicated
  ``r·in``, B sharded like its block ``out/t·r``;
- row-parallel (``out``, ``down``; the spec splits dim 1): A sharded ``r·in/t``, B
  replicated ``out·r``;
- replicated (K|V with fewer K/V heads than TP ranks): A ``r·in`` and B ``out·r``, whole.

Biases, norms, the embedding and the output head get no adapter.
"""

from __future__ import annotations

from engine.models.config import ModelConfig
from engine.models.inventory import CanonicalTensor, ParameterSpec
from engine.peft.config import LoraConfig


def block_name(tensor: CanonicalTensor) -> str:
    """The canonical block a weight is (``q``, ``k``, ``v``, ``out``, ``gate``, ``up``,
    ``down`` for ``layers.{n}.attention.q.weight`` and the like), as `LoraConfig.blocks` names
    them."""
    return tensor.name.rsplit(".", 2)[-2]


def _layer_weights(model: ModelConfig, tp_size: int) -> list[ParameterSpec]:
    """One decoder layer's matrices (the parameters `apply_lora` may adapt) on ``tp_size``
    ranks."""
    inventory = model.inventory(tp_size)
    return [
        spec
        for spec in inventory.stage_specs([0], first=False, last=False)
        if spec.name.endswith(".weight") and len(spec.full_shape) == 2
    ]


def _targeted_parts(
    model: ModelConfig, lora: LoraConfig, tp_size: int
) -> list[tuple[ParameterSpec, CanonicalTensor]]:
    """``(layer parameter, block)`` of every adapter of one decoder layer."""
    targeted = lora.blocks()
    return [
        (spec, part)
        for spec in _layer_weights(model, tp_size)
        for part in spec.parts
        if block_name(part) in targeted
    ]


def lora_layer_parameters(model: ModelConfig, lora: LoraConfig, tp_size: int) -> int:
    """Adapter parameters (every A and B) of one decoder layer on one TP rank."""
    r, total = lora.rank, 0
    for spec, part in _targeted_parts(model, lora, tp_size):
        out, inp = part.shape
        if spec.tp_dim == 0:
            total += r * inp + out // tp_size * r
        elif spec.tp_dim == 1:
            total += r * (inp // tp_size) + out * r
        else:
            total += r * inp + out * r
    return total


def lora_parameters_per_rank(
    model: ModelConfig, lora: LoraConfig, tp_size: int, layers: int
) -> int:
    """Adapter parameters on one TP rank of a pipeline stage holding ``layers`` decoder
    layers (every layer has the same adapters)."""
    return layers * lora_layer_parameters(model, lora, tp_size)


def lora_parameters(model: ModelConfig, lora: LoraConfig) -> int:
    """Adapter parameters of the whole model (no TP, every layer)."""
    return lora_parameters_per_rank(model, lora, 1, model.num_layers)


def lora_activation_bytes_per_layer(
    model: ModelConfig,
    lora: LoraConfig,
    seq_length: int,
    micro_batch_size: int,
    tp_size: int,
    bytes_per_value: int = 2,
) -> int:
    """Bytes one decoder layer's adapters add to what backward keeps, per microbatch, on one
    TP rank (an approximation).

    Each adapted layer keeps ``u = A x`` for B's gradient: ``r`` values per token per adapter,
    over the whole sequence on a column-parallel or replicated layer (``u`` is gathered, or
    replicated, before B) and over the sequence shard on a row-parallel one under sequence
    parallelism (``u`` is reduce-scattered). The input ``x`` is the layer's own, already
    counted. With ``--lora-dropout`` each adapter also keeps its dropped copy of the input and
    a one-byte mask: the layer input's features (``in/t`` on a row-parallel layer, which sees
    the whole sequence; the sequence shard elsewhere under sequence parallelism). Not counted:
    each layer's B placed block-wise in its rows for the product (parameter-sized).
    """
    s, b, r = seq_length, micro_batch_size, lora.rank
    sp = tp_size if model.sequence_parallel else 1
    u_values = dropped_values = 0
    for spec, part in _targeted_parts(model, lora, tp_size):
        row_parallel = spec.tp_dim == 1
        u_values += (s * b // sp if row_parallel else s * b) * r
        if lora.dropout > 0:
            tokens = s * b if row_parallel else s * b // sp
            dropped_values += tokens * (part.shape[1] // tp_size if row_parallel else part.shape[1])
    return (u_values + dropped_values) * bytes_per_value + dropped_values  # masks: 1 byte each


_BLOCK_ORDER = {"q": "q", "k": "k", "v": "v", "out": "o", "gate": "gate", "up": "up",
                "down": "down"}  # fmt: skip
"""The canonical blocks in the model's order, with the short HF name printed for each
(``o`` for ``o_proj``)."""


def targeted_modules(lora: LoraConfig) -> str:
    """The adapted HF modules, short and in the model's order: ``q,k,v,o,gate,up,down``."""
    blocks = lora.blocks()
    return ",".join(short for block, short in _BLOCK_ORDER.items() if block in blocks)
