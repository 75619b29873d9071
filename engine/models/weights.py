"""A layout-free view of a model's weights: full tensors under canonical names.

Whatever the TP size and however projections are fused, the same model has the same canonical
tensors, as its parameter inventory names them (for LLaMA: ``embedding.weight [vocab, h]``,
``layers.{n}.attention.{q,k,v,out}.weight``, ``layers.{n}.mlp.{gate,up,down}.weight``,
``layers.{n}.{input_norm,post_attention_norm}.weight``, ``final_norm.weight``,
``output_layer.weight`` (absent when tied on this stage)). Layer numbers are global,
vocabulary padding is dropped. Parity tests compare layouts in this view; checkpoint
conversion reads and writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.models.chunk import inventory_of, layer_numbers
from engine.models.inventory import ParameterSpec
from engine.tensor_parallel.sharding import gather_tensor, rows_over_data_parallel, shard_tensor


def global_name(model: nn.Module, name: str) -> str:
    """``layers.{local}.x`` -> ``layers.{global layer number}.x``."""
    if not name.startswith("layers."):
        return name
    _, local, rest = name.split(".", 2)
    return f"layers.{layer_numbers(model)[int(local)]}.{rest}"


def check_built_as_declared(
    model: nn.Module, layer_numbers: Sequence[int], first: bool, last: bool
) -> None:
    """Raise ValueError unless the chunk's parameters are exactly those its inventory declares
    for its stage (a parameter declared but not built, or built but not declared, would
    otherwise be silently left out of checkpoints and conversion)."""
    declared = {s.name for s in inventory_of(model).stage_specs(layer_numbers, first, last)}
    built = {global_name(model, name) for name, _ in model.named_parameters()}
    if declared != built:
        raise ValueError(
            f"{type(model).__name__} does not build what its inventory declares: declared, not "
            f"built: {sorted(declared - built)[:5]}; built, not declared: "
            f"{sorted(built - declared)[:5]}"
        )


def named_specs(model: nn.Module) -> list[tuple[str, nn.Parameter, ParameterSpec]]:
    """Every parameter of ``model`` (one chunk) with its spec in the model's inventory,
    under its global name; ValueError when a parameter's shape is not the declared one."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = []
    for name, param in model.named_parameters():
        spec = inventory_of(model).spec(global_name(model, name))
        if tuple(param.shape) != spec.local_shape(tp):
            raise ValueError(
                f"parameter {spec.name} has shape {tuple(param.shape)}; its inventory declares "
                f"{spec.local_shape(tp)} at TP={tp}"
            )
        out.append((spec.name, param, spec))
    return out


def split_parts(full: torch.Tensor, spec: ParameterSpec) -> dict[str, torch.Tensor]:
    """The canonical tensors a full (fused, padded) parameter holds; padding dropped."""
    rows = [part.shape[0] for part in spec.parts]
    pieces = full[: sum(rows)].split(rows, dim=0)
    return {part.name: piece for part, piece in zip(spec.parts, pieces, strict=True)}


def join_parts(parts: list[torch.Tensor], spec: ParameterSpec) -> torch.Tensor:
    """The full parameter from its canonical tensors: fused along dim 0, vocabulary padding
    rows zero (as the model initialises them)."""
    full = torch.cat(parts, dim=0)
    padding = spec.full_shape[0] - full.size(0)
    if padding > 0:
        full = torch.cat([full, full.new_zeros(padding, *full.shape[1:])])
    return full


def gather_full_state(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full tensors (or their gradients) of this rank's stage, on the CPU.

    Collective over the TP group: every TP rank of the stage must call it.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    out: dict[str, torch.Tensor] = {}
    for name, param, spec in named_specs(model):
        tensor = param.grad if grads else param.detach()
        if tensor is None:
            raise ValueError(f"parameter {name} has no gradient")
        if spec.tp_dim is not None:
            tensor = gather_tensor(tensor, spec.tp_dim, spec.partition_sizes, group)
        out.update(split_parts(tensor.cpu(), spec))
    return out


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set this rank's shards from full canonical tensors (the inverse of `gather_full_state`).

    Raises KeyError naming the first missing tensor and ValueError on a shape mismatch.
    """
    for name, param, spec in named_specs(model):
        full = join_parts([_take(tensors, part.name) for part in spec.parts], spec)
        copy_shard(param, full, spec.tp_dim, spec.partition_sizes, f"tensor {name}")


def copy_shard(
    param: nn.Parameter,
    full: torch.Tensor,
    tp_dim: int | None,
    partition_sizes: Sequence[int],
    what: str,
) -> None:
    """Set ``param`` to this TP rank's shard of ``full`` (split along ``tp_dim`` in blocks of
    ``partition_sizes``; None: the whole of it); ValueError naming ``what`` when the shapes
    differ."""
    if tp_dim is not None:
        group = parallel_state.get_tensor_model_parallel_group()
        full = shard_tensor(full, tp_dim, partition_sizes, dist.get_rank(group),
                            dist.get_world_size(group))  # fmt: skip
    if full.shape != param.shape:
        raise ValueError(
            f"{what}: expected shape {tuple(param.shape)} on this rank, got {tuple(full.shape)}"
        )
    with torch.no_grad():
        param.copy_(rows_over_data_parallel(full.to(param.device), param))


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise KeyError(f"tensor {name} is missing from the weights being loaded")
    return tensors[name]
