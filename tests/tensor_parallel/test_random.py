"""RNG streams under tensor/pipeline/data parallelism, and recomputation that replays them.

Multi-rank checks run in one pool of 4 gloo ranks, used with two layouts so that every axis is
covered without starting 8 processes: TP=2 x PP=2 (TP ranks within a stage, and stages against
each other) and TP=2 x DP=2 (DP replicas against each other).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import parallel_state
from engine.tensor_parallel.random import (
    MODEL_PARALLEL_RNG_NAME,
    RNGStatesTracker,
    checkpoint,
    get_rng_states,
    get_rng_tracker,
    model_parallel_seed,
    set_rng_states,
)
from tests.rank_pool import module_pool

SEED = 1234
NUM_DRAWS = 256


pool = module_pool(4)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Tests here reseed the process's streams; leave them as other test modules found them."""
    tracker = get_rng_tracker()
    saved = tracker.get_states()
    with torch.random.fork_rng(devices=[]):
        yield
    tracker.set_states(saved)


def _dropout_mask() -> torch.Tensor:
    """A dropout mask drawn from whatever stream is current: [NUM_DRAWS] bool."""
    return F.dropout(torch.ones(NUM_DRAWS), p=0.5, training=True) != 0


# Multi-rank: which ranks agree ------------------------------------------------------------------


def _draw_masks(tp: int, pp: int) -> dict:
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        model_parallel_seed(SEED)
        outside = _dropout_mask()
        with get_rng_tracker().fork():
            inside = _dropout_mask()
        after = _dropout_mask()
        return {
            "tp": parallel_state.get_tensor_model_parallel_rank(),
            "dp": parallel_state.get_data_parallel_rank(),
            "pp": parallel_state.get_pipeline_model_parallel_rank(),
            "outside": outside,
            "inside": inside,
            "after": after,
        }
    finally:
        parallel_state.destroy_model_parallel()


def _expected_masks(stage_seed: int, tp_rank: int) -> dict:
    """What one rank should draw, from the seeding rule alone, in this process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed)
        outside, after = _dropout_mask(), _dropout_mask()
        torch.manual_seed(stage_seed + 2718 + tp_rank)
        inside = _dropout_mask()
    return {"outside": outside, "inside": inside, "after": after}


def test_masks_across_tp_ranks_and_pipeline_stages(pool):
    results = pool.run(_draw_masks, 2, 2)
    assert [(r["tp"], r["dp"], r["pp"]) for r in results] == [
        (0, 0, 0),
        (1, 0, 0),
        (0, 0, 1),
        (1, 0, 1),
    ]
    by = {(r["tp"], r["pp"]): r for r in results}
    for pp in range(2):
        # Replicated activations: every TP rank of a stage draws the same mask.
        assert torch.equal(by[0, pp]["outside"], by[1, pp]["outside"])
        assert torch.equal(by[0, pp]["after"], by[1, pp]["after"])
        # Sharded activations: independent masks per TP rank.
        assert not torch.equal(by[0, pp]["inside"], by[1, pp]["inside"])
    # Stages hold different layers: their default streams differ.
    assert not torch.equal(by[0, 0]["outside"], by[0, 1]["outside"])
    for r in results:
        expected = _expected_masks(SEED + 100 * r["pp"], r["tp"])
        for key in ("outside", "inside", "after"):
            # "after" equal to the second plain draw: fork() did not consume the default stream.
            assert torch.equal(r[key], expected[key]), (r["tp"], r["pp"], key)


def test_masks_agree_across_data_parallel_replicas(pool):
    results = pool.run(_draw_masks, 2, 1)
    assert [(r["tp"], r["dp"], r["pp"]) for r in results] == [
        (0, 0, 0),
        (1, 0, 0),
        (0, 1, 0),
        (1, 1, 0),
    ]
    by = {(r["tp"], r["dp"]): r for r in results}
    for tp in range(2):
        # DP replicas compute the same function: same masks inside and outside.
        for key in ("outside", "inside", "after"):
            assert torch.equal(by[tp, 0][key], by[tp, 1][key]), (tp, key)
    assert not torch.equal(by[0, 0]["inside"], by[1, 0]["inside"])
    assert torch.equal(by[0, 0]["outside"], by[1, 0]["outside"])


# Single process: the tracker ----------------------------------------------------------------------


def test_fork_continues_its_stream_and_leaves_the_default_one_alone():
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("a", 7)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = _dropout_mask()
    outside = _dropout_mask()
    with tracker.fork("a"):
        second = _dropout_mask()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        expected_first, expected_second = _dropout_mask(), _dropout_mask()
        torch.manual_seed(0)
        expected_outside = _dropout_mask()
    assert torch.equal(first, expected_first)
    assert torch.equal(second, expected_second)  # saved back on exit, not restarted
    assert torch.equal(outside, expected_outside)


def test_fork_restores_the_default_stream_when_the_block_raises():
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("a", 7)
    torch.manual_seed(0)
    with pytest.raises(ZeroDivisionError), tracker.fork("a"):
        _dropout_mask()
        raise ZeroDivisionError
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        expected = _dropout_mask()
    assert torch.equal(_dropout_mask(), expected)


def test_tracker_states_save_and_restore_reproduce_the_draws():
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("a", 1)
    tracker.add("b", 2)
    with tracker.fork("a"):
        _dropout_mask()  # advance, so the saved state is not just the seed's
    saved = tracker.get_states()
    draws = []
    for name in ("a", "b", "a"):
        with tracker.fork(name):
            draws.append(_dropout_mask())
    tracker.set_states(saved)
    for name, draw in zip(("a", "b", "a"), draws, strict=True):
        with tracker.fork(name):
            assert torch.equal(_dropout_mask(), draw), name
    # A copy: advancing the tracker did not change what was saved.
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(_dropout_mask(), draws[0])


def test_all_rng_states_roundtrip_for_an_exact_resume():
    model_parallel_seed(SEED)
    _dropout_mask()
    states = get_rng_states()
    outside = _dropout_mask()
    with get_rng_tracker().fork():
        inside = _dropout_mask()
    model_parallel_seed(SEED + 1)  # a different job state, as after a restart
    set_rng_states(states)
    assert torch.equal(_dropout_mask(), outside)
    with get_rng_tracker().fork():
        assert torch.equal(_dropout_mask(), inside)


def test_model_parallel_seed_without_parallel_groups_counts_ranks_as_zero():
    model_parallel_seed(SEED)
    assert get_rng_tracker().names() == [MODEL_PARALLEL_RNG_NAME]
    expected = _expected_masks(SEED, tp_rank=0)
    assert torch.equal(_dropout_mask(), expected["outside"])
    with get_rng_tracker().fork():
        assert torch.equal(_dropout_mask(), expected["inside"])


def test_tracker_rejects_reused_names_and_seeds_and_unknown_forks():
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1 .* already used by 'a'"):
        tracker.add("b", 1)
    with pytest.raises(KeyError, match="'c' is not in the tracker"), tracker.fork("c"):
        pass


# Single process: recomputation --------------------------------------------------------------------

HIDDEN, FFN, BATCH = 8, 40, 3  # FFN is a width no input has, to spot the intermediate


class _DropoutMLP(nn.Module):
    """fc1 -> gelu -> dropout (shared stream) -> dropout (model-parallel stream) -> fc2.

    Records how often it runs, the masks it draws and (weakly) its widest intermediate.
    """

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, FFN)
        self.fc2 = nn.Linear(FFN, HIDDEN)
        self.calls = 0
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.intermediate: weakref.ref | None = None

    def forward(
        self, x: torch.Tensor, scale: float, shift: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [batch, HIDDEN]; shift: [FFN], no grad -> ([batch, HIDDEN], [batch], [] long)."""
        self.calls += 1
        pre_activation = self.fc1(x)
        self.intermediate = weakref.ref(pre_activation)  # gelu's backward needs it
        h = F.gelu(pre_activation) + shift
        h = F.dropout(h, p=0.5, training=True)
        outside = h != 0
        with get_rng_tracker().fork():
            h = F.dropout(h, p=0.5, training=True)
        self.masks.append((outside, h != 0))
        return self.fc2(h) * scale, h.sum(dim=-1), (h != 0).sum()


def _run_mlp(recompute: bool) -> dict:
    """One forward + backward from fixed weights, inputs and RNG states."""
    torch.manual_seed(0)
    mlp = _DropoutMLP()
    x = torch.randn(BATCH, HIDDEN, requires_grad=True)
    shift = torch.randn(FFN)
    model_parallel_seed(SEED)
    if recompute:
        y, row_sums, kept = checkpoint(mlp, x, 0.5, shift)
    else:
        y, row_sums, kept = mlp(x, 0.5, shift)
    calls_after_forward = mlp.calls
    # Draws between forward and backward, as the next layer or microbatch makes: the backward's
    # replay must not rewind the streams past them.
    _dropout_mask()
    with get_rng_tracker().fork():
        _dropout_mask()
    (y.pow(2).sum() + row_sums.sum()).backward()
    next_outside = _dropout_mask()
    with get_rng_tracker().fork():
        next_inside = _dropout_mask()
    return {
        "y": y.detach(),
        "row_sums": row_sums.detach(),
        "kept": kept,
        "grads": {"x": x.grad, **{name: p.grad for name, p in mlp.named_parameters()}},
        "calls": (calls_after_forward, mlp.calls),
        "masks": mlp.masks,
        "next": (next_outside, next_inside),
    }


def test_checkpoint_is_bit_identical_to_the_plain_function():
    plain, recomputed = _run_mlp(recompute=False), _run_mlp(recompute=True)
    for key in ("y", "row_sums", "kept"):
        assert torch.equal(plain[key], recomputed[key]), key
    assert plain["grads"].keys() == recomputed["grads"].keys()
    for name, grad in plain["grads"].items():
        assert recomputed["grads"][name] is not None, name
        assert torch.equal(grad, recomputed["grads"][name]), name
    # The function really ran again in the backward pass ...
    assert plain["calls"] == (1, 1)
    assert recomputed["calls"] == (1, 2)
    # ... with the original masks, on both streams.
    (first_outside, first_inside), (again_outside, again_inside) = recomputed["masks"]
    assert torch.equal(first_outside, again_outside)
    assert torch.equal(first_inside, again_inside)
    assert torch.equal(first_outside, plain["masks"][0][0])
    assert torch.equal(first_inside, plain["masks"][0][1])
    # Afterwards the streams are where the plain run left them, not replayed.
    for after_plain, after_recomputed in zip(plain["next"], recomputed["next"], strict=True):
        assert torch.equal(after_plain, after_recomputed)


def _saved_widths(recompute: bool) -> tuple[set[int], bool]:
    """Last-dimension sizes of the tensors autograd saves, and if the intermediate survives."""
    torch.manual_seed(0)
    mlp = _DropoutMLP()
    x = torch.randn(BATCH, HIDDEN, requires_grad=True)
    model_parallel_seed(SEED)
    widths: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        widths.add(tensor.shape[-1] if tensor.dim() else 0)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        # A scalar shift: no input of width FFN, so width FFN can only come from activations.
        outputs = (checkpoint if recompute else _call)(mlp, x, 1.0, torch.tensor(0.0))
    gc.collect()
    assert outputs[0].requires_grad  # the graph is alive while we look
    return widths, mlp.intermediate() is not None


def _call(function, *args):
    return function(*args)


def test_checkpoint_keeps_only_the_inputs():
    plain_widths, plain_alive = _saved_widths(recompute=False)
    # The plain graph holds [batch, FFN] activations (so the check can see them) ...
    assert FFN in plain_widths and plain_alive
    # ... the checkpointed one only its inputs: x [batch, HIDDEN] and the scalar shift.
    recompute_widths, recompute_alive = _saved_widths(recompute=True)
    assert recompute_widths == {HIDDEN, 0}
    assert not recompute_alive


def test_checkpoint_under_no_grad_runs_once_and_misuse_is_reported():
    mlp = _DropoutMLP()
    model_parallel_seed(SEED)
    with torch.no_grad():
        y, _, _ = checkpoint(mlp, torch.randn(BATCH, HIDDEN), 1.0, torch.zeros(FFN))
    assert mlp.calls == 1 and not y.requires_grad
    with pytest.warns(UserWarning, match="no tensor input requires grad"):
        checkpoint(mlp, torch.randn(BATCH, HIDDEN), 1.0, torch.zeros(FFN))

    x = torch.randn(BATCH, HIDDEN, requires_grad=True)
    y, _, _ = checkpoint(mlp, x, 1.0, torch.zeros(FFN))
    with pytest.raises(RuntimeError, match="with .backward\\(\\) only"):
        torch.autograd.grad(y.sum(), x)
