"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

A transformer block pairs them so that one all-reduce (or, with sequence parallelism, one
all-gather and one reduce-scatter) covers a whole attention or MLP sub-block:

    x [s, b, h] -> ColumnParallel -> [s, b, o/tp] -> local op -> RowParallel -> [s, b, h]

Initialisation does not depend on the layout: each layer builds its full (unsharded) weight in
float32, fills it with ``init_method``, and keeps its own slice. With seeded init methods,
gathered weights are therefore identical for every TP size. The full weight is drawn on the CPU,
or on the GPU when the layer is built there and its init method can draw on any device
(`draws_on_any_device`: the normal inits): the GPU's generator gives other values than the
CPU's, equally layout-free. Built on the meta device, a layer draws nothing.

Parameters carry the attributes of `engine.tensor_parallel.attributes` that gradient clipping
and reduction read: ``tensor_model_parallel``, ``partition_dim`` and ``partition_sizes`` (the
full sizes of the blocks that are each split over TP, for fused projections such as Q|K|V or
gate|up), and ``partial_grad_over_tp``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine import parallel_state
from engine.tensor_parallel.attributes import mark_partial_over_tp, mark_tensor_parallel
from engine.tensor_parallel.mappings import (
    all_gather_along_first_dim,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_along_first_dim,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from engine.tensor_parallel.sharding import shard_pieces

InitMethod = Callable[[torch.Tensor], None]
"""Fills a full, unsharded float32 weight in place: a CPU one, or one on any device if the
method is marked with `any_device`."""

_ANY_DEVICE = "_draws_on_any_device"


def any_device(init_method: InitMethod) -> InitMethod:
    """Mark ``init_method`` as able to fill a weight on any device (its generator, if any, made
    on the weight's device); returns it."""
    setattr(init_method, _ANY_DEVICE, True)
    return init_method


def draws_on_any_device(init_method: InitMethod) -> bool:
    """Whether ``init_method`` is marked with `any_device` (unmarked ones get a CPU weight)."""
    return bool(getattr(init_method, _ANY_DEVICE, False))


def normal_init(std: float = 0.02, seed: int | None = None) -> InitMethod:
    """Normal(0, std) init; with a seed it draws from its own generator (layout-independent),
    made on the weight's device: on the CPU the values are those of ``torch.Generator()``."""

    def init(weight: torch.Tensor) -> None:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=weight.device).manual_seed(seed)
        with torch.no_grad():
            weight.normal_(0.0, std, generator=generator)

    return any_device(init)


def vocab_padded_init(init_method: InitMethod, vocab_size: int) -> InitMethod:
    """Init the first ``vocab_size`` rows of a vocabulary-padded weight; padding rows are zero."""

    def init(full: torch.Tensor) -> None:
        init_method(full[:vocab_size])
        with torch.no_grad():
            full[vocab_size:].zero_()

    return any_device(init) if draws_on_any_device(init_method) else init


def _tp_group_rank_size(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup, int, int]:
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what} ({total}) is not divisible by tensor parallel size ({parts})")
    return total // parts


def _make_weight(
    shape: tuple[int, int], dtype: torch.dtype | None, device: torch.device | str | None
) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device))


_scratch: list[torch.Tensor] | None = None
"""The buffer that CPU full weights are drawn into inside `initialisation_scratch`."""


@contextlib.contextmanager
def initialisation_scratch() -> Iterator[None]:
    """Inside it, the full weights `initialise_shard` draws on the CPU share one buffer (grown
    to the largest) instead of a fresh allocation each: the pages of a large fresh tensor are
    faulted in one by one, which costs as much as drawing into them. Construction is one
    thread; nested uses share the outer buffer."""
    global _scratch
    if _scratch is not None:
        yield
        return
    _scratch = [torch.empty(0)]
    try:
        yield
    finally:
        _scratch = None


def _cpu_full(shape: tuple[int, int]) -> torch.Tensor:
    numel = math.prod(shape)
    if _scratch is None:
        return torch.empty(shape, dtype=torch.float32, device="cpu")
    if _scratch[0].numel() < numel:
        _scratch[0] = torch.empty(0)  # freed before the larger one is allocated
        _scratch[0] = torch.empty(numel, dtype=torch.float32, device="cpu")
    return _scratch[0][:numel].view(shape)


def initialise_shard(
    weight: nn.Parameter,
    full_shape: tuple[int, int],
    init_method: InitMethod,
    partition_dim: int,
    partition_sizes: Sequence[int],
    rank: int,
    world: int,
) -> None:
    """Fill ``weight`` with this rank's slice of a freshly initialised full weight (the whole
    of it with ``world=1``, for a replicated weight); nothing on the meta device.

    The full weight is drawn on the weight's GPU when ``init_method`` `draws_on_any_device`
    (no host generation, no host-to-device copy), else on the CPU. A float32 weight that is
    the whole of it is drawn in place (the same values, without a copy)."""
    if weight.device.type == "meta":
        return
    on_gpu = weight.device.type == "cuda" and draws_on_any_device(init_method)
    with torch.no_grad():
        if (
            world == 1
            and tuple(weight.shape) == tuple(full_shape)
            and weight.dtype == torch.float32
            and weight.is_contiguous()
            and (on_gpu or weight.device.type == "cpu")
        ):
            init_method(weight)
            return
        # Explicit device: under a `torch.device(...)` context a bare `torch.empty` follows it.
        if on_gpu:
            full = torch.empty(full_shape, dtype=torch.float32, device=weight.device)
        else:
            full = _cpu_full(full_shape)
        init_method(full)
        # Piece by piece into the weight itself (`shard_tensor` would concatenate a copy).
        offset = 0
        for piece in shard_pieces(full, partition_dim, partition_sizes, rank, world):
            weight.narrow(partition_dim, offset, piece.size(partition_dim)).copy_(piece)
            offset += piece.size(partition_dim)


class _SequenceParallelLinear(torch.autograd.Function):
    """``all_gather_seq(x) @ W^T + b`` that keeps only this rank's sequence shard of ``x``.

    Saving the gathered input would cost ``tp`` times the activation memory that sequence
    parallelism exists to save; the backward gathers it again instead (Megatron's trade: one
    more all-gather of ``[s, b, h]`` per layer and pass).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(all_gather_along_first_dim(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        # Each rank's input gradient covers the whole sequence but only its output columns:
        # reduce-scatter sums the partials and hands back this rank's sequence shard.
        grad_x = reduce_scatter_along_first_dim(grad_out.matmul(weight), ctx.group)
        rows_out = grad_out.reshape(-1, grad_out.size(-1))
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a frozen weight (a LoRA base) costs no gather or GEMM
            full_x = all_gather_along_first_dim(x, ctx.group)
            grad_weight = rows_out.t().matmul(full_x.reshape(-1, full_x.size(-1)))
        grad_bias = rows_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def linear_with_sequence_parallel_input(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``[s/tp, b, i]`` sequence shard -> ``[s, b, o']``: all-gather the sequence, then the
    linear, keeping only the shard for the backward."""
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return _SequenceParallelLinear.apply(x, weight, bias, group)


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with the output features (rows of A) split over the TP group.

    Args:
        input_size: input features ``h``.
        output_size: output features, or a list of block sizes for a fused projection
            (e.g. ``[q, kv, kv]``): each block is split over TP on its own, so every rank holds
            whole heads of each.
        bias: add a (sharded) bias.
        gather_output: all-gather the output so every rank gets all features.
        sequence_parallel: the input is sharded along the sequence; it is all-gathered first.
        init_method: fills the full weight (see `InitMethod`); default normal(0, 0.02).

    Shapes:
        input ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism; any leading dims
        otherwise), output ``[s, b, o/tp]`` (``[s, b, o]`` with ``gather_output``).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int | Sequence[int],
        *,
        bias: bool = False,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        group: dist.ProcessGroup | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.group, rank, world = _tp_group_rank_size(group)
        sizes = [output_size] if isinstance(output_size, int) else list(output_size)
        if gather_output and len(sizes) > 1:
            raise ValueError("gather_output is not supported for fused (multi-block) projections")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output cannot be combined with sequence_parallel")
        local = [_divide(size, world, "output block size") for size in sizes]
        self.input_size, self.output_size = input_size, sum(sizes)
        self.output_size_per_partition = sum(local)
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel

        self.weight = _make_weight((self.output_size_per_partition, input_size), dtype, device)
        initialise_shard(
            self.weight, (self.output_size, input_size), init_method or normal_init(),
            0, sizes, rank, world,
        )  # fmt: skip
        mark_tensor_parallel(self.weight, 0, sizes)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(self.output_size_per_partition, dtype=dtype, device=device)
            )
            mark_tensor_parallel(self.bias, 0, sizes)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` overrides the layer's own (a tied output head passes the embedding's)."""
        weight = self.weight if weight is None else weight
        if self.sequence_parallel:
            y = linear_with_sequence_parallel_input(x, weight, self.bias, self.group)
        else:
            y = F.linear(copy_to_tensor_model_parallel_region(x, self.group), weight, self.bias)
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, self.group)
        return y


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with the input features (columns of A) split over the TP group.

    Each rank multiplies its slice of the input by its slice of A; the partial products are
    summed by an all-reduce (or reduce-scattered along the sequence with sequence parallelism).

    Args:
        input_is_parallel: the input already arrives split along its last dimension (from a
            column-parallel layer); otherwise it is scattered first.
        sequence_parallel: leave the output sharded along the sequence: ``[s/tp, b, h]``.

    Shapes:
        input ``[s, b, i/tp]`` (``[s, b, i]`` when not ``input_is_parallel``), output
        ``[s, b, o]`` (``[s/tp, b, o]`` with sequence parallelism).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        group: dist.ProcessGroup | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.group, rank, world = _tp_group_rank_size(group)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel requires input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _divide(input_size, world, "input size")
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel

        self.weight = _make_weight((output_size, self.input_size_per_partition), dtype, device)
        initialise_shard(
            self.weight, (output_size, input_size), init_method or normal_init(),
            1, [input_size], rank, world,
        )  # fmt: skip
        mark_tensor_parallel(self.weight, 1, [input_size])
        if bias:
            # The bias is added once, after the reduction, so it is replicated; with sequence
            # parallelism each rank sees a slice of the sequence, so its gradient is partial.
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device))
            mark_partial_over_tp(self.bias, sequence_parallel)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tensor_model_parallel_region(y, self.group)
        return y if self.bias is None else y + self.bias


def pad_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's ``--make-vocab-size-divisible-by``: pad to a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split over the TP group.

    Each rank looks up the ids in its vocabulary range and contributes zeros for the others;
    an all-reduce (or a reduce-scatter along the sequence) assembles the result. Padding rows
    (ids ``vocab_size .. padded_vocab_size``) are initialised to zero.

    Args:
        vocab_size: the tokenizer's vocabulary size.
        make_vocab_size_divisible_by: padding granularity per TP rank (Megatron's default 128).
        sequence_parallel: ids come sequence-first ``[s, b]`` and the output stays sharded
            along the sequence, ``[s/tp, b, h]``.

    Shapes:
        ids ``[*]`` -> ``[*, h]``; with sequence parallelism ``[s, b]`` -> ``[s/tp, b, h]``.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        *,
        make_vocab_size_divisible_by: int = 128,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        group: dist.ProcessGroup | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.group, rank, world = _tp_group_rank_size(group)
        self.vocab_size, self.embedding_dim = vocab_size, embedding_dim
        self.padded_vocab_size = pad_vocab_size(vocab_size, world, make_vocab_size_divisible_by)
        self.num_embeddings_per_partition = self.padded_vocab_size // world
        self.vocab_start_index = rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.sequence_parallel = sequence_parallel

        self.weight = _make_weight(
            (self.num_embeddings_per_partition, embedding_dim), dtype, device
        )
        initialise_shard(
            self.weight, (self.padded_vocab_size, embedding_dim),
            vocab_padded_init(init_method or normal_init(), vocab_size),
            0, [self.padded_vocab_size], rank, world,
        )  # fmt: skip
        mark_tensor_parallel(self.weight, 0, [self.padded_vocab_size])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if dist.get_world_size(self.group) > 1:
            outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
            local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(ids, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group)
        return reduce_from_tensor_model_parallel_region(out, self.group)
