"""LoRA on the engine's tensor-parallel layers, with PEFT's math per HF module:

    y = W x + (B_j (A_j dropout(x))) * alpha / r     for every targeted block j of W

A fused projection (Q|K|V, gate|up) gets one adapter per block, as PEFT gives one per HF
module, so the update equals PEFT's. Where A and B live over TP follows the layer:

- column-parallel ``W [o/tp, h]``: A ``[r, h]`` replicated, B ``[o_j/tp, r]`` sharded like its
  block of W. ``u = A x`` is computed on this rank's input (the sequence shard under sequence
  parallelism) and then gathered along the sequence or marked as entering the TP region: the
  same collective as the layer's own input, on ``r`` features instead of ``h``. Its backward
  sums the partial ``dL/du`` of every rank, so A's gradient is complete on each rank without
  sequence parallelism and partial (this rank's tokens) with it;
- row-parallel ``W [h, i/tp]``: A ``[r, i/tp]`` sharded like W's columns, B ``[h, r]``
  replicated. ``A x`` is partial on each rank and goes through the layer's reduction
  (all-reduce, or reduce-scatter along the sequence), again on ``r`` features; B's gradient is
  partial under sequence parallelism (as the layer's bias);
- replicated K|V (fewer K/V heads than TP ranks: a replicated layer that computes only this
  rank's rows, which it picks with its ``head_rows(t)``): A and B replicated; each rank
  applies the rows of B of its own K/V head, so B's gradient is always partial.

Partial gradients are marked `mark_partial_over_tp` and summed by `finalize_model_grads`;
sharded adapters carry the TP attributes of `engine.tensor_parallel.attributes`. The adapters
attach to their layer (``layer.lora``, added to its output by a forward hook), so they live
on whatever pipeline chunk holds it, and the base parameters keep their names.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from engine import parallel_state
from engine.models.chunk import config_of, inventory_of
from engine.models.inventory import CanonicalTensor, ParameterSpec
from engine.models.weights import copy_shard, global_name
from engine.peft.config import LoraConfig
from engine.tensor_parallel import (
    ColumnParallelLinear,
    InitMethod,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from engine.tensor_parallel.attributes import (
    is_partial_over_tp,
    is_tensor_parallel,
    mark_partial_over_tp,
    mark_tensor_parallel,
)
from engine.tensor_parallel.layers import initialise_shard
from engine.tensor_parallel.random import MODEL_PARALLEL_RNG_NAME, get_rng_tracker
from engine.tensor_parallel.sharding import gather_tensor, whole_over_data_parallel
from engine.wrappers import unwrap

PEFT_PREFIX = "base_model.model."
"""What PEFT's saved adapters (``get_peft_model_state_dict``) put before a HF module name."""


def is_lora_parameter(param: nn.Parameter) -> bool:
    """``param`` is a LoRA A or B (trainable; not in the model's inventory)."""
    return bool(getattr(param, "lora_adapter", False))


def adapter_spec(model: nn.Module, name: str, param: nn.Parameter) -> ParameterSpec:
    """The declaration of the adapter parameter ``name`` of one chunk, as the model's
    inventory declares its own (what checkpoints place, save and reshard by): the canonical
    name ``layers.{n}.attention.q.lora_A`` (its block's, global layer number), the full shape
    over TP, and the dimension TP splits (None: replicated)."""
    projection, _, adapter = global_name(model, name).partition(".lora.adapters.")
    block, kind = adapter.split(".")
    canonical = f"{projection.rsplit('.', 1)[0]}.{block}.{kind}"
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shape, tp_dim, sizes = tuple(param.shape), None, ()
    if is_tensor_parallel(param) and tp > 1:
        tp_dim, sizes = param.partition_dim, tuple(param.partition_sizes)  # type: ignore[attr-defined]
        shape = tuple(n * tp if d == tp_dim else n for d, n in enumerate(shape))
    tensor = CanonicalTensor(canonical, shape)
    return ParameterSpec(canonical, (tensor,), shape, tp_dim, sizes,
                         partial_grad_over_tp=is_partial_over_tp(param))  # fmt: skip


@dataclass(frozen=True)
class _Block:
    """One HF module's rows in a layer's weight."""

    tensor: CanonicalTensor
    """Its canonical weight (``layers.3.attention.q.weight``, global layer number)."""
    rows: int
    """Its rows in this rank's weight (``q/tp`` for a column-parallel block)."""

    @property
    def name(self) -> str:
        """The canonical block: ``q``, ``k``, ``v``, ``out``, ``gate``, ``up``, ``down``."""
        return self.tensor.name.rsplit(".", 2)[-2]

    def hf_module(self) -> str:
        """Its HF module (``model.layers.3.self_attn.q_proj``)."""
        if self.tensor.hf is None:
            raise ValueError(f"{self.tensor.name} has no HF name")
        return self.tensor.hf.removesuffix(".weight")


class LoraAdapter(nn.Module):
    """One HF module's ``lora_A [r, in(/tp)]`` and ``lora_B [out(/tp), r]`` (this rank's
    shards where they are sharded)."""

    def __init__(self, a_shape: tuple[int, int], b_shape: tuple[int, int], like: torch.Tensor):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=like.dtype, device=like.device))
        for param in (self.lora_A, self.lora_B):
            param.lora_adapter = True  # type: ignore[attr-defined]


def _kaiming_uniform(seed: int) -> InitMethod:
    """PEFT's A init, ``kaiming_uniform_(a=sqrt(5))`` on the full ``[r, in]``, from its own
    generator (so the full A is the same at any TP)."""

    def init(full: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(seed)
        nn.init.kaiming_uniform_(full, a=5**0.5, generator=generator)

    return init


LoraTarget = nn.Module
"""A column- or row-parallel linear, or a replicated one computing only some rows (it has
``head_rows``: a model family's replicated K|V projection)."""


def _is_target(module: nn.Module) -> bool:
    return isinstance(module, ColumnParallelLinear | RowParallelLinear) or callable(
        getattr(module, "head_rows", None)
    )


class LoraLinear(nn.Module):
    """The adapters of one parallel layer and the update they add to its output.

    With the targeted blocks' A stacked, ``A [n*r, in(/tp)]``, and their B placed block-wise in
    the layer's rows, ``B [rows, n*r]`` (zero for a block without an adapter), the update is
    ``x -> (A x) -> B (A x) * scale`` and merging adds ``B A * scale`` to this rank's weight.

    Shapes: input as the layer's (``[s/tp, b, h]``, ``[s, b, h]`` or ``[s, b, i/tp]``),
    update as its output (``[s, b, o/tp]``, ``[s/tp, b, h]``, ``[s, b, h]``, ``[s, b, 2d]``).
    """

    def __init__(
        self,
        layer: LoraTarget,
        blocks: list[_Block],
        targeted: frozenset[str],
        lora: LoraConfig,
        init_seed: int,
    ):
        super().__init__()
        if isinstance(layer, RowParallelLinear) and not layer.input_is_parallel:
            raise ValueError("LoRA on a RowParallelLinear needs input_is_parallel=True")
        self.row_parallel = isinstance(layer, RowParallelLinear)
        self.blocks, self.scaling = blocks, lora.scaling
        self.sequence_parallel = bool(layer.sequence_parallel)
        self.dropout = nn.Dropout(lora.dropout)
        self.hook: RemovableHandle | None = None
        """Adds the update to the layer's output (set by `apply_lora`)."""
        # A replicated K|V layer computes only this rank's K and V head: B's rows follow it.
        self.select_rows = getattr(layer, "head_rows", None)
        self.adapters = nn.ModuleDict()
        group = parallel_state.get_tensor_model_parallel_group()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        r, weight = lora.rank, cast(torch.Tensor, layer.weight)
        for block in blocks:
            if block.name not in targeted:
                continue
            in_full = block.tensor.shape[1]
            adapter = LoraAdapter((r, weight.shape[1]), (block.rows, r), weight)
            seed_name = block.tensor.name.removesuffix(".weight") + ".lora_A"
            seed = zlib.crc32(f"{init_seed}:{seed_name}".encode())
            if self.row_parallel:
                initialise_shard(adapter.lora_A, (r, in_full), _kaiming_uniform(seed), 1,
                                 [in_full], rank, world)  # fmt: skip
                mark_tensor_parallel(adapter.lora_A, 1, [in_full])
                mark_partial_over_tp(adapter.lora_B, self.sequence_parallel)
            else:
                initialise_shard(adapter.lora_A, (r, in_full), _kaiming_uniform(seed), 0,
                                 [r], 0, 1)  # fmt: skip
                mark_partial_over_tp(adapter.lora_A, self.sequence_parallel)
                if isinstance(layer, ColumnParallelLinear):
                    mark_tensor_parallel(adapter.lora_B, 0, [block.tensor.shape[0]])
                else:
                    mark_partial_over_tp(adapter.lora_B)
            self.adapters[block.name] = adapter

    def _placed_b(self) -> torch.Tensor:
        """This rank's B of every targeted block, placed in the layer's rows: ``[rows, n*r]``,
        block j's B in its rows and columns ``j*r : (j+1)*r``, zeros elsewhere."""
        adapters = self._adapters()
        r, n = adapters[0].lora_A.shape[0], len(adapters)
        rows, column = [], 0
        for block in self.blocks:
            if block.name in self.adapters:
                b = cast(LoraAdapter, self.adapters[block.name]).lora_B
                rows.append(nn.functional.pad(b, (column, (n - 1) * r - column)))
                column += r
            else:
                rows.append(adapters[0].lora_B.new_zeros(block.rows, n * r))
        return torch.cat(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.cat([self._drop(x) @ a.lora_A.t() for a in self._adapters()], dim=-1)
        if self.row_parallel:
            # A x is partial on each rank (a slice of the input features): the layer's reduction.
            if self.sequence_parallel:
                u = reduce_scatter_to_sequence_parallel_region(u)
            else:
                u = reduce_from_tensor_model_parallel_region(u)
        elif self.sequence_parallel:
            u = gather_from_sequence_parallel_region(u)
        else:
            u = copy_to_tensor_model_parallel_region(u)
        b = self._placed_b()
        if self.select_rows is not None:
            b = self.select_rows(b)
        return (u @ b.t()) * self.scaling

    def _adapters(self) -> list[LoraAdapter]:
        return [cast(LoraAdapter, a) for a in self.adapters.values()]

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the adapters' input: from the per-TP-rank RNG stream where ranks hold
        different elements (a sequence or feature shard), else the common one."""
        if not (self.training and self.dropout.p > 0):
            return x
        if self.sequence_parallel or self.row_parallel:
            with get_rng_tracker().fork(MODEL_PARALLEL_RNG_NAME):
                return self.dropout(x)
        return self.dropout(x)

    def delta_weight(self) -> torch.Tensor:
        """``B A * scale`` in this rank's weight layout (what merging adds)."""
        a = torch.cat([adapter.lora_A for adapter in self._adapters()])  # [n*r, in(/tp)]
        return (self._placed_b() @ a) * self.scaling


def _add_lora_update(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    return output + cast(LoraLinear, module.lora)(args[0])


def _lora_targets(model: nn.Module) -> list[tuple[str, LoraTarget]]:
    return [(name, module) for name, module in model.named_modules() if _is_target(module)]


def _blocks(model: nn.Module, name: str, layer: LoraTarget, tp: int) -> list[_Block]:
    spec = inventory_of(model).spec(global_name(model, f"{name}.weight"))
    split = isinstance(layer, ColumnParallelLinear)
    return [_Block(part, part.shape[0] // tp if split else part.shape[0]) for part in spec.parts]


def apply_lora(model: nn.Module, config: LoraConfig) -> list[nn.Parameter]:
    """Give the targeted projections of one model chunk (possibly DDP-wrapped: apply before
    wrapping, DDP sizes its buffers by ``requires_grad``) adapters, in place; freeze every
    other parameter. Returns the adapter parameters (A and B of each, in module order).

    Raises ValueError naming a bad config, or a chunk that already has adapters.
    """
    model = unwrap(model)
    targeted = config.blocks()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    init_seed = config_of(model).init_seed
    for name, layer in _lora_targets(model):
        if hasattr(layer, "lora"):
            raise ValueError(f"{name} already has LoRA adapters")
        blocks = _blocks(model, name, layer, tp)
        if not any(block.name in targeted for block in blocks):
            continue
        # Attributes of the layer, so that the adapters live (and move) with it.
        path = LoraLinear(layer, blocks, targeted, config, init_seed)
        layer.add_module("lora", path)
        path.hook = layer.register_forward_hook(_add_lora_update)
    adapters = [p for p in model.parameters() if is_lora_parameter(p)]
    for param in model.parameters():
        param.requires_grad_(is_lora_parameter(param))
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        # The frozen embedding's output needs no gradient, so a recomputed (checkpointed)
        # decoder layer would see no input requiring one and its adapters would get none:
        # mark it, as PEFT's ``enable_input_require_grads`` does for HF models.
        embedding.register_forward_hook(_output_requires_grad)
    return adapters


def _output_requires_grad(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraTarget, LoraLinear]]:
    return [
        (name, layer, cast(LoraLinear, layer.lora))
        for name, layer in _lora_targets(unwrap(model))
        if isinstance(getattr(layer, "lora", None), LoraLinear)
    ]


def _adapter_tensors(path: LoraLinear) -> list[tuple[str, nn.Parameter]]:
    """``(PEFT name, parameter)`` of every A and B of one layer."""
    out = []
    for block in path.blocks:
        if block.name in path.adapters:
            adapter = cast(LoraAdapter, path.adapters[block.name])
            module = PEFT_PREFIX + block.hf_module()
            out += [(f"{module}.lora_A.weight", adapter.lora_A)]
            out += [(f"{module}.lora_B.weight", adapter.lora_B)]
    return out


def lora_state(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """The full (TP-gathered) A and B (or their gradients) of this chunk's adapters, on the
    CPU, under PEFT's saved names (``base_model.model.model.layers.3.self_attn.q_proj.lora_A
    .weight``). Collective over the TP group."""
    group = parallel_state.get_tensor_model_parallel_group()
    out: dict[str, torch.Tensor] = {}
    for _, _, path in _lora_layers(model):
        for name, param in _adapter_tensors(path):
            tensor = param.grad if grads else param.detach()
            if tensor is None:
                raise ValueError(f"LoRA parameter {name} has no gradient")
            tensor = whole_over_data_parallel(tensor)  # FSDP2 shards it over DP too
            if is_tensor_parallel(param):
                tensor = gather_tensor(tensor, param.partition_dim, param.partition_sizes, group)  # type: ignore[attr-defined]
            out[name] = tensor.cpu()
    return out


def load_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set this chunk's adapters from full A and B under PEFT's names (the inverse of
    `lora_state`; keys of other chunks are ignored). KeyError naming a missing tensor."""
    for _, _, path in _lora_layers(model):
        for name, param in _adapter_tensors(path):
            if name not in tensors:
                raise KeyError(f"LoRA tensor {name} is missing from the adapters being loaded")
            sharded = is_tensor_parallel(param)
            dim = param.partition_dim if sharded else None  # type: ignore[attr-defined]
            sizes = param.partition_sizes if sharded else ()  # type: ignore[attr-defined]
            copy_shard(param, tensors[name], dim, sizes, f"LoRA tensor {name}")


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (``W += B A * scale``, block by block) and
    remove it, as PEFT's ``merge_and_unload``: the chunk is a plain model again, whose
    weights `engine.models.weights.gather_full_state` exports. Base parameters stay frozen.
    No communication: each rank's shard of ``B A`` is its own B (or A) shard times the other."""
    for _, layer, path in _lora_layers(model):
        weight = cast(torch.Tensor, layer.weight)
        weight.add_(path.delta_weight().to(weight.dtype))
        if path.hook is not None:
            path.hook.remove()
        delattr(layer, "lora")
