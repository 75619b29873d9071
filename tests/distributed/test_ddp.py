"""Data parallelism and the distributed optimizer against a single process, on real gloo ranks.

The reference is plain PyTorch: the unwrapped model on the whole global batch,
``torch.optim.AdamW`` (no decay on norms and biases) and ``clip_grad_norm_``. The parallel
runs split the same global batch over DP ranks and microbatches, go through
DistributedDataParallel (buckets, optional overlap), finalize_model_grads and our optimizer
(replicated or ZeRO-1). After 5 steps, losses, gradient norms and every parameter (gathered to
full canonical tensors) must agree within 1e-5 relative in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from engine import parallel_state
from engine.distributed import DistributedDataParallel, finalize_model_grads
from engine.distributed.config import DistributedDataParallelConfig
from engine.models import LlamaModel, ModelConfig
from engine.models.weights import gather_full_state
from engine.optimizer import MixedPrecisionOptimizer, build_optimizer
from engine.optimizer.config import OptimizerConfig
from engine.optimizer.optimizer import full_state_from_local, uses_weight_decay
from tests.rank_pool import module_pool

GLOBAL_BATCH, SEQ, STEPS = 8, 16, 5
# Small buckets so that the tiny model spans several, and DP slices cut through parameters.
BUCKET = 30_000


pool = module_pool(4)


def batches(vocab_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of (inputs, labels), each ``[GLOBAL_BATCH, SEQ]``."""
    generator = torch.Generator().manual_seed(11)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=generator)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def optimizer_config(**overrides) -> OptimizerConfig:
    # adam_eps 1e-5: gradients agree with the reference to ~5e-7 of each tensor's largest
    # element (summation order differs with the split of the batch), so an element whose
    # gradient is ~1e-9 differs by ~50%; with Adam's default eps (1e-8) such an element moves by
    # up to lr either way. With eps 1e-5 Adam's response to near-zero gradients stays linear,
    # so the comparison measures the parallelism, not float rounding.
    defaults = dict(
        lr=1e-3, weight_decay=0.1, clip_grad=0.5, lr_decay_style="constant", adam_eps=1e-5
    )
    return OptimizerConfig(**{**defaults, **overrides})


def torch_adamw(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.AdamW:
    """PyTorch's reference AdamW (single-tensor loop), no decay on norms and biases."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if uses_weight_decay(n, p)], "wd_mult": 1.0},
        {
            "params": [p for n, p in named if not uses_weight_decay(n, p)],
            "weight_decay": 0.0, "wd_mult": 0.0,
        },
    ]  # fmt: skip
    return torch.optim.AdamW(
        groups, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
        weight_decay=opt.weight_decay, foreach=False,
    )  # fmt: skip


def reference_training(model_config: ModelConfig, opt: OptimizerConfig, steps: int) -> dict:
    """Single process, whole global batch, torch.optim.AdamW: losses, norms, full weights.

    Needs model-parallel groups of size 1 (TP=1) to build the model; no communication."""
    model = LlamaModel(model_config)
    adamw = torch_adamw(model, opt)
    losses, norms = [], []
    for inputs, labels in batches(model_config.vocab_size, steps):
        adamw.zero_grad()
        loss = model(inputs, labels=labels).mean()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad).item())
        adamw.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "weights": gather_full_state(model)}


def data_parallel_subgroup(size: int) -> dist.ProcessGroup:
    """Consecutive global ranks in groups of ``size`` (every rank creates every group)."""
    mine = None
    for start in range(0, dist.get_world_size(), size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= dist.get_rank() < start + size:
            mine = group
    return mine


def build(
    model_config: ModelConfig,
    ddp: DistributedDataParallelConfig,
    opt: OptimizerConfig,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[DistributedDataParallel, MixedPrecisionOptimizer]:
    """This rank's DDP-wrapped model and optimizer (model-parallel groups already up)."""
    model = DistributedDataParallel(LlamaModel(model_config), ddp, dp_group)
    return model, build_optimizer(opt, [model])


def train_steps(
    model: DistributedDataParallel,
    optimizer: MixedPrecisionOptimizer,
    step_batches: list[tuple[torch.Tensor, torch.Tensor]],
    micro_batch: int,
) -> tuple[list[float], list[float | None]]:
    """Megatron's iteration: microbatches under no_sync but the last, finalize, step.

    Returns the global-batch losses (averaged over DP) and the gradient norms."""
    group = model.data_parallel_group
    dp, rank = dist.get_world_size(group), dist.get_rank(group)
    losses, norms = [], []
    for inputs, labels in step_batches:
        local = GLOBAL_BATCH // dp
        rows = slice(rank * local, (rank + 1) * local)
        micro = list(
            zip(inputs[rows].split(micro_batch), labels[rows].split(micro_batch), strict=True)
        )
        optimizer.zero_grad()
        total = torch.zeros(1)
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else model.no_sync():
                loss = model(x, labels=y).float().mean() / len(micro)
                optimizer.scale_loss(loss).backward()
            total += loss.detach()
        finalize_model_grads([model])
        result = optimizer.step()
        dist.all_reduce(total, group=group)
        losses.append(total.item() / dp)
        norms.append(result.grad_norm)
    model.finish_param_sync()
    return losses, norms


def reference_on_rank0(model_config: ModelConfig, opt: OptimizerConfig) -> dict | None:
    """`reference_training` on global rank 0 (None elsewhere), under TP=1 groups."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        reference = reference_training(model_config, opt, STEPS) if dist.get_rank() == 0 else None
        # Keep the ranks together: the others would otherwise tear groups down and build the
        # next layout's while rank 0 still computes.
        dist.barrier()
    finally:
        parallel_state.destroy_model_parallel()
    return reference


def parity_run(
    model_config: ModelConfig,
    tp: int,
    ddp: DistributedDataParallelConfig,
    opt: OptimizerConfig,
    micro_batch: int,
    dp: int | None = None,
) -> dict | None:
    """Reference on rank 0, then the parallel run; rank 0 returns both. ``dp`` smaller than
    the world / TP: replicas of ``dp`` consecutive ranks each train the same global batch."""
    reference = reference_on_rank0(model_config, opt)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        dp_group = None if dp is None else data_parallel_subgroup(dp)
        model, optimizer = build(model_config, ddp, opt, dp_group)
        losses, norms = train_steps(
            model, optimizer, batches(model_config.vocab_size, STEPS), micro_batch
        )
        weights = gather_full_state(model.module)
    finally:
        parallel_state.destroy_model_parallel()
    if dist.get_rank() != 0:
        return None
    return {
        "reference": reference,
        "parallel": {"losses": losses, "norms": norms, "weights": weights},
    }


def assert_same_training(reference: dict, other: dict, what: str) -> None:
    torch.testing.assert_close(
        torch.tensor(other["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(other["norms"]), torch.tensor(reference["norms"]), rtol=1e-5, atol=0
    )
    assert other["weights"].keys() == reference["weights"].keys(), what
    for name, weight in reference["weights"].items():
        scale = weight.abs().max().item()
        torch.testing.assert_close(
            other["weights"][name],
            weight,
            rtol=1e-5,
            atol=1e-5 * scale,
            msg=lambda m, name=name: f"{what}: {name}\n{m}",
        )


@pytest.mark.parametrize("distributed_optimizer", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("dp", [2, 4])
def test_dp_matches_single_process(pool, dp, overlap, distributed_optimizer):
    ddp = DistributedDataParallelConfig(
        overlap_grad_reduce=overlap, use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=overlap and distributed_optimizer, bucket_size=BUCKET,
    )  # fmt: skip
    config, micro_batch = ModelConfig.from_preset("tiny"), 4 // dp
    result = pool.run(parity_run, config, 1, ddp, optimizer_config(), micro_batch, dp)[0]
    assert_same_training(result["reference"], result["parallel"], f"DP={dp} {ddp}")


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_tp2_dp2_matches_single_process(pool, distributed_optimizer):
    """TP=2 x DP=2 with sequence parallelism (norm gradients are TP-partial) and GQA with
    replicated K/V (a partial, replicated weight)."""
    config = ModelConfig.from_preset("tiny-gqa", num_query_groups=1, sequence_parallel=True)
    ddp = DistributedDataParallelConfig(
        overlap_grad_reduce=True, use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=distributed_optimizer, bucket_size=BUCKET,
    )  # fmt: skip
    result = pool.run(parity_run, config, 2, ddp, optimizer_config(), 2)[0]
    assert_same_training(result["reference"], result["parallel"], f"TP=2 x DP=2 {ddp}")


# Communication volume ---------------------------------------------------------------------

_COLLECTIVES = (
    "all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single",
    "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter",
)  # fmt: skip


@contextlib.contextmanager
def recording_collectives(log: list[tuple[str, int, int]]) -> Iterator[None]:
    """Record ``(op, group size, bytes)`` of every collective while calling the real one.

    Bytes are the buffer the algorithm moves: the tensor for all-reduce and broadcast, the
    full (input) tensor for reduce-scatter, the full (output) tensor for all-gather."""
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name, real):
        def recorded(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            full = max(tensors, key=torch.Tensor.numel) if tensors else None
            size = dist.get_world_size(kwargs.get("group"))
            nbytes = 0 if full is None else full.numel() * full.element_size()
            log.append((name, size, nbytes))
            return real(*args, **kwargs)

        return recorded

    for name, real in originals.items():
        setattr(dist, name, wrap(name, real))
    try:
        yield
    finally:
        for name, real in originals.items():
            setattr(dist, name, real)


def one_step_collectives(ddp: DistributedDataParallelConfig) -> dict:
    """One DP=4 iteration (two microbatches): the collectives it issued and the buffer sizes."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        model, optimizer = build(ModelConfig.from_preset("tiny"), ddp, optimizer_config())
        ((inputs, labels),) = batches(model.module.config.vocab_size, 1)
        rank = dist.get_rank()
        micro = [
            (inputs[2 * rank + i : 2 * rank + i + 1], labels[2 * rank + i : 2 * rank + i + 1])
            for i in range(2)
        ]
        log, launched = [], []
        with recording_collectives(log):
            optimizer.zero_grad()
            for i, (x, y) in enumerate(micro):
                with contextlib.nullcontext() if i == 1 else model.no_sync():
                    (model(x, labels=y).mean() / 2).backward()
                launched.append([bucket.grad_launched for bucket in model.buckets])
            finalize_model_grads([model])
            optimizer.step()
            model.finish_param_sync()
        (buffer,) = model.grad_buffers
        return {
            "log": log,
            "launched_after_backward": launched,
            "grad_bytes": buffer.grad_data.numel() * buffer.grad_data.element_size(),
            "param_bytes": buffer.numel * buffer.param_dtype.itemsize,
            "buckets": len(buffer.buckets),
        }
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("overlap", [False, True])
def test_one_all_reduce_of_the_gradient_buffer(pool, overlap):
    ddp = DistributedDataParallelConfig(overlap_grad_reduce=overlap, bucket_size=BUCKET)
    for result in pool.run(one_step_collectives, ddp):
        log, n = result["log"], result["buckets"]
        assert n > 1
        assert all(op == "all_reduce" and size == 4 for op, size, _ in log), log
        assert sum(nbytes for _, _, nbytes in log) == result["grad_bytes"]
        assert len(log) == n
        # Nothing launches in the no_sync microbatch; with overlap every bucket launched in
        # the last backward, before finalize_model_grads.
        assert result["launched_after_backward"] == [[False] * n, [overlap] * n]


@pytest.mark.parametrize("overlap", [False, True])
def test_distributed_optimizer_one_reduce_scatter_and_one_all_gather(pool, overlap):
    ddp = DistributedDataParallelConfig(
        overlap_grad_reduce=overlap, use_distributed_optimizer=True,
        overlap_param_gather=overlap, bucket_size=BUCKET,
    )  # fmt: skip
    for result in pool.run(one_step_collectives, ddp):
        log, n = result["log"], result["buckets"]
        big = [(op, nbytes) for op, _, nbytes in log if nbytes > 8]
        scatter = [b for op, b in big if op.startswith("reduce_scatter")]
        gather = [b for op, b in big if op.startswith("all_gather")]
        assert len(scatter) == len(gather) == n and len(big) == 2 * n, log
        assert sum(scatter) == result["grad_bytes"]
        assert sum(gather) == result["param_bytes"]
        # The only other traffic: the squared gradient norm summed over the DP slices.
        assert [(op, nbytes) for op, _, nbytes in log if nbytes <= 8] == [("all_reduce", 4)]


def accumulation_without_no_sync() -> str:
    """Two microbatches with --overlap-grad-reduce but no no_sync: the second backward's
    gradients would miss the reductions launched by the first; this must fail loudly."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        ddp = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=BUCKET)
        model, _ = build(ModelConfig.from_preset("tiny"), ddp, optimizer_config())
        ((inputs, labels),) = batches(model.module.config.vocab_size, 1)
        model(inputs[:1], labels=labels[:1]).mean().backward()
        try:
            model(inputs[1:2], labels=labels[1:2]).mean().backward()
        except RuntimeError as error:
            return str(error)
        finally:
            model.finish_grad_sync()  # drain what the first backward launched
        return "no error"
    finally:
        parallel_state.destroy_model_parallel()


def test_overlap_without_no_sync_fails_loudly(pool):
    for message in pool.run(accumulation_without_no_sync):
        assert "no_sync" in message, message


# Optimizer state memory ---------------------------------------------------------------------


def state_bytes_run(dtype: torch.dtype) -> dict:
    """Per-rank optimizer-state bytes after one step, replicated and distributed (DP=4)."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        config = ModelConfig.from_preset("tiny", params_dtype=dtype)
        opt = optimizer_config(bf16=dtype == torch.bfloat16)
        out = {}
        for distributed in (False, True):
            ddp = DistributedDataParallelConfig(
                use_distributed_optimizer=distributed, bucket_size=BUCKET
            )
            model, optimizer = build(config, ddp, opt)
            train_steps(model, optimizer, batches(config.vocab_size, 1), micro_batch=2)
            out[distributed] = optimizer.state_bytes()
            with torch.no_grad():  # new model weights (as from a checkpoint) reach the main params
                for param in model.module.parameters():
                    param.mul_(0.5)
            optimizer.reload_model_params()
            for shard in optimizer.shards:
                assert torch.equal(shard.main_param, shard.model_data.float()), shard.name
            out["buckets"] = len(model.buckets)
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distributed_optimizer_state_is_one_dp_th(pool, dtype):
    # Per element of state: exp_avg + exp_avg_sq (fp32 model: main params alias it), plus the
    # float32 main parameter for bf16.
    per_element = 8 if dtype == torch.float32 else 12
    for result in pool.run(state_bytes_run, dtype):
        replicated, sharded = result[False], result[True]
        padding = result["buckets"] * 4 * 64 * per_element  # at most one shard alignment each
        assert abs(sharded - replicated / 4) <= padding, (replicated, sharded, padding)
        assert sharded < replicated / 4 + padding
    print(f"{dtype}: optimizer state per rank {replicated} B replicated, {sharded} B sharded")


# Resharding the optimizer state ------------------------------------------------------------


def reshard_run(model_config: ModelConfig, opt: OptimizerConfig) -> dict | None:
    """3 steps at DP=4 (ZeRO-1), gather the state, resume at DP=2 (ZeRO-1 with other buckets,
    and replicated) for 2 more steps; rank 0 also returns the uninterrupted reference."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        reference = reference_training(model_config, opt, STEPS) if dist.get_rank() == 0 else None
        data = batches(model_config.vocab_size, STEPS)
        ddp = DistributedDataParallelConfig(
            use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True,
            bucket_size=BUCKET,
        )  # fmt: skip
        model, optimizer = build(model_config, ddp, opt)
        first_losses, _ = train_steps(model, optimizer, data[:3], micro_batch=1)
        state = optimizer.full_state_dict()
        # The same state from per-rank pieces (as if read from every rank's checkpoint file).
        locals_ = [None] * dist.get_world_size()
        dist.all_gather_object(locals_, optimizer.local_state_dict())
        assembled = full_state_from_local(locals_)
        assert assembled["step"] == state["step"] == 3
        for name, tensors in state["params"].items():
            for key, tensor in tensors.items():
                assert torch.equal(assembled["params"][name][key], tensor), (name, key)
        dp2 = data_parallel_subgroup(2)
        resumed = {}
        for distributed, bucket in ((True, 10_000), (False, None)):
            ddp = DistributedDataParallelConfig(
                use_distributed_optimizer=distributed, bucket_size=bucket
            )
            model, optimizer = build(model_config, ddp, opt, dp2)
            optimizer.load_full_state_dict(state)  # float32 main params restore the model too
            losses, _ = train_steps(model, optimizer, data[3:], micro_batch=2)
            resumed[distributed] = {
                "losses": first_losses + losses,
                "weights": gather_full_state(model.module),
            }
        return {"reference": reference, "resumed": resumed} if dist.get_rank() == 0 else None
    finally:
        parallel_state.destroy_model_parallel()


def test_optimizer_state_reloads_at_another_dp_size(pool):
    result = pool.run(reshard_run, ModelConfig.from_preset("tiny"), optimizer_config())[0]
    for distributed, run in result["resumed"].items():
        run["norms"] = result["reference"]["norms"] = []  # not recorded across the restart
        assert_same_training(result["reference"], run, f"DP=4 -> DP=2 distributed={distributed}")
