"""Each tensor-parallel layer against its plain PyTorch counterpart, on real gloo ranks.

Every check builds the full reference (nn.Linear, nn.Embedding, F.cross_entropy) from the
same full weights in every rank, runs both, and compares outputs and all gradients (sharded
ones gathered back to full tensors).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import parallel_state
from engine.distributed.finalize_grads import finalize_model_grads
from engine.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from engine.tensor_parallel.sharding import gather_tensor
from tests.rank_pool import module_pool

TP = 4
S, B, H, OUT = 8, 2, 16, 24


pool = module_pool(TP)


def _in_tp(check):
    """Run ``check`` with TP=4 groups up, tear them down after."""

    def run(*args):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
        try:
            return check(*args)
        finally:
            parallel_state.destroy_model_parallel()

    run.__name__, run.__qualname__ = check.__name__, check.__qualname__  # picklable by name
    return run


def _full(param: torch.nn.Parameter, tensor: torch.Tensor | None = None) -> torch.Tensor:
    tensor = param.detach() if tensor is None else tensor
    group = parallel_state.get_tensor_model_parallel_group()
    return gather_tensor(tensor, param.partition_dim, param.partition_sizes, group)


def _data(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _reference_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    ref = torch.nn.Linear(weight.size(1), weight.size(0), bias=bias is not None)
    with torch.no_grad():
        ref.weight.copy_(weight)
        if bias is not None:
            ref.bias.copy_(bias)
    return ref


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _product(fused: torch.Tensor) -> torch.Tensor:
    a, b = fused.chunk(2, dim=-1)
    return a * b


@_in_tp
def column_then_row_linear(sequence_parallel: bool) -> bool:
    """Column (two fused blocks, bias) -> a * b -> Row (bias), as in SwiGLU; sharded or not
    along the sequence. Each rank's product is its slice of the full ``a * b``."""
    column = ColumnParallelLinear(H, [OUT, OUT], bias=True, sequence_parallel=sequence_parallel)
    row = RowParallelLinear(OUT, H, bias=True, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        column.bias.normal_(generator=torch.Generator().manual_seed(3))
    ref_column = _reference_linear(_full(column.weight), _full(column.bias))
    ref_row = _reference_linear(_full(row.weight), row.bias.detach())

    x = _data(S, B, H, seed=1)
    x_local = x.detach().clone().requires_grad_()
    inputs = scatter_to_sequence_parallel_region(x_local) if sequence_parallel else x_local
    y = row(_product(column(inputs)))
    y_full = (
        gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
        if (sequence_parallel)
        else y
    )
    y_ref = ref_row(_product(ref_column(x)))
    _close(y_full, y_ref)

    y_full.square().sum().backward()
    y_ref.square().sum().backward()
    _close(x_local.grad, x.grad)
    _close(_full(column.weight, column.weight.grad), ref_column.weight.grad)
    _close(_full(column.bias, column.bias.grad), ref_column.bias.grad)
    _close(_full(row.weight, row.weight.grad), ref_row.weight.grad)
    # Under sequence parallelism each rank saw a slice of the sequence, so its row bias
    # gradient is partial: the layer marks it, and the step's gradient finalisation sums it
    # (before that mark, nothing summed it and TP ranks drifted apart).
    finalize_model_grads([torch.nn.ModuleList([column, row])])
    _close(row.bias.grad, ref_row.bias.grad)
    return True


@_in_tp
def gathered_column_and_scattered_row() -> bool:
    """ColumnParallelLinear(gather_output) and RowParallelLinear(input_is_parallel=False)."""
    column = ColumnParallelLinear(H, OUT, gather_output=True)
    row = RowParallelLinear(OUT, H, input_is_parallel=False)
    ref_column = _reference_linear(_full(column.weight), None)
    ref_row = _reference_linear(_full(row.weight), None)
    x = _data(S, B, H, seed=2)
    x_local = x.detach().clone().requires_grad_()
    hidden = column(x_local)
    assert hidden.shape == (S, B, OUT)
    y, y_ref = row(hidden), ref_row(ref_column(x))
    _close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    _close(x_local.grad, x.grad)
    _close(_full(row.weight, row.weight.grad), ref_row.weight.grad)
    _close(_full(column.weight, column.weight.grad), ref_column.weight.grad)
    return True


@_in_tp
def embedding(sequence_parallel: bool) -> bool:
    vocab = 1000  # padded to 1024 (4 x 128) at TP=4: ids on every rank, padding on the last
    layer = VocabParallelEmbedding(vocab, H, sequence_parallel=sequence_parallel)
    full = _full(layer.weight)
    assert full.shape == (1024, H) and not full[vocab:].any()
    reference = torch.nn.Embedding(vocab, H, _weight=full[:vocab].clone())
    ids = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(4))
    if sequence_parallel:
        out = gather_from_sequence_parallel_region(
            layer(ids.t()), tensor_parallel_output_grad=False
        )
        out = out.transpose(0, 1)
    else:
        out = layer(ids)
    expected = reference(ids)
    _close(out, expected)
    weights = torch.arange(H, dtype=torch.float32)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    _close(_full(layer.weight, layer.weight.grad)[:vocab], reference.weight.grad)
    return True


@_in_tp
def cross_entropy_ignores_padding() -> bool:
    vocab, padded = 1001, 1024
    logits = _data(B, S, padded, seed=5)
    with torch.no_grad():
        logits[..., vocab:] = 1e4  # padding that would win every softmax if it counted
    target = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(6))
    local = scatter_to_tensor_model_parallel_region(logits.detach().clone()).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, vocab_size=vocab)
    expected = F.cross_entropy(
        logits[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none"
    )
    _close(loss, expected.view(B, S))
    loss.sum().backward()
    expected.sum().backward()
    grad = gather_from_tensor_model_parallel_region(local.grad)
    _close(grad, logits.grad)
    assert not grad[..., vocab:].any(), "padded vocabulary entries must carry no gradient"
    return True


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_column_then_row_parallel_linear(pool, sequence_parallel):
    assert all(pool.run(column_then_row_linear, sequence_parallel))


def test_gather_output_and_unsplit_input(pool):
    assert all(pool.run(gathered_column_and_scattered_row))


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_vocab_parallel_embedding(pool, sequence_parallel):
    assert all(pool.run(embedding, sequence_parallel))


def test_vocab_parallel_cross_entropy_ignores_padding(pool):
    assert all(pool.run(cross_entropy_ignores_padding))
