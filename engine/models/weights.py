"""A layout-free view of a `LlamaModel`'s weights: full tensors under canonical names.

Whatever the TP size and however projections are fused, the same model has the same canonical
tensors: ``embedding.weight [vocab, h]``, ``layers.{n}.attention.{q,k,v,out}.weight``,
``layers.{n}.mlp.{gate,up,down}.weight``, ``layers.{n}.{input_norm,post_attention_norm}.weight``,
``final_norm.weight``, ``output_layer.weight [vocab, h]`` (absent when tied on this stage).
Layer numbers are global, vocabulary padding is dropped. Parity tests compare layouts in this
view; checkpoint conversion reads and writes it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.tensor_parallel.sharding import gather_tensor, shard_tensor

# Fused parameters and the canonical tensors they hold, in order along dim 0.
FUSED_PARAMETERS = {
    "attention.qkv.weight": ("attention.q.weight", "attention.k.weight", "attention.v.weight"),
    "attention.kv.weight": ("attention.k.weight", "attention.v.weight"),
    "mlp.gate_up.weight": ("mlp.gate.weight", "mlp.up.weight"),
}
VOCAB_PADDED_PARAMETERS = ("embedding.weight", "output_layer.weight")


def global_name(model: nn.Module, name: str) -> str:
    """``layers.{local}.x`` -> ``layers.{global layer number}.x``."""
    if not name.startswith("layers."):
        return name
    _, local, rest = name.split(".", 2)
    return f"layers.{model.layers[int(local)].layer_number}.{rest}"


def block_sizes(param: nn.Parameter, parts: int) -> list[int]:
    sizes = getattr(param, "partition_sizes", None)
    return list(sizes) if sizes and len(sizes) == parts else [param.size(0) // parts] * parts


def gather_full_state(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full tensors (or their gradients) of this rank's stage, on the CPU.

    Collective over the TP group: every TP rank of the stage must call it.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    vocab = model.config.vocab_size
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.detach()
        if tensor is None:
            raise ValueError(f"parameter {name} has no gradient")
        if getattr(param, "tensor_model_parallel", False):
            tensor = gather_tensor(tensor, param.partition_dim, param.partition_sizes, group)
        tensor = tensor.cpu()
        name = global_name(model, name)
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if suffix in FUSED_PARAMETERS:
            prefix = name[: -len(suffix)]
            pieces = tensor.split(block_sizes(param, len(FUSED_PARAMETERS[suffix])), dim=0)
            out.update(
                {prefix + part: p for part, p in zip(FUSED_PARAMETERS[suffix], pieces, strict=True)}
            )
        elif name in VOCAB_PADDED_PARAMETERS:
            out[name] = tensor[:vocab]
        else:
            out[name] = tensor
    return out


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set this rank's shards from full canonical tensors (the inverse of `gather_full_state`).

    Raises KeyError naming the first missing tensor and ValueError on a shape mismatch.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for name, param in model.named_parameters():
        name = global_name(model, name)
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if suffix in FUSED_PARAMETERS:
            prefix = name[: -len(suffix)]
            full = torch.cat(
                [_take(tensors, prefix + part) for part in FUSED_PARAMETERS[suffix]], dim=0
            )
        else:
            full = _take(tensors, name)
        if name in VOCAB_PADDED_PARAMETERS:
            padding = (param.size(0) * (world if param.tensor_model_parallel else 1)) - full.size(0)
            full = torch.cat([full, full.new_zeros(padding, full.size(1))])
        if getattr(param, "tensor_model_parallel", False):
            full = shard_tensor(full, param.partition_dim, param.partition_sizes, rank, world)
        if full.shape != param.shape:
            raise ValueError(
                f"tensor {name}: expected shape {tuple(param.shape)} on this rank, got "
                f"{tuple(full.shape)}"
            )
        with torch.no_grad():
            param.copy_(full)


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise KeyError(f"tensor {name} is missing from the weights being loaded")
    return tensors[name]
