"""The optimizer under TP=2 x PP=2 x DP=2 (8 gloo ranks, the pipeline schedules), mixed
precision, and our AdamW against ``torch.optim.AdamW``.

- 3D parity: 5 steps through the 1F1B schedule with DDP and our optimizer equal the
  single-process reference (plain ``torch.optim.AdamW`` + ``clip_grad_norm_``): losses,
  gradient norms (so clipping sees the same global norm, counting TP-replicated norm weights
  and the tied embedding once) and every parameter within 1e-5 relative.
- fp16: an inf injected into one rank's gradient skips the step on every rank, halves the
  loss scale, and training continues; bf16 follows the fp32 loss curve loosely over 20 steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist

from engine import parallel_state
from engine.distributed import DistributedDataParallel, finalize_model_grads
from engine.distributed.config import DistributedDataParallelConfig
from engine.models import LlamaModel, ModelConfig
from engine.models.build import build_model_chunks
from engine.models.weights import gather_full_state
from engine.optimizer import build_lr_scheduler, build_optimizer
from engine.optimizer.config import OptimizerConfig
from engine.pipeline_parallel.schedules import get_forward_backward_func
from tests.distributed.test_ddp import (
    GLOBAL_BATCH,
    SEQ,
    STEPS,
    assert_same_training,
    batches,
    data_parallel_subgroup,
    optimizer_config,
    reference_on_rank0,
    torch_adamw,
)
from tests.rank_pool import module_pool

TP, PP, DP = 2, 2, 2
MICRO_BATCH = 2


pool = module_pool(8)


def forward_step(data_iterator: Iterator, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    inputs, labels = next(data_iterator)
    losses = model(inputs, labels=labels)  # [b, s] on the last stage, hidden states elsewhere
    return losses, lambda out: (out.float().mean(), out.detach().float().mean())


def pipeline_training(
    model_config: ModelConfig,
    ddp: DistributedDataParallelConfig,
    opt: OptimizerConfig,
    step_batches: list,
    inject_inf_at: int | None = None,
) -> dict:
    """Train under TP x PP x DP with the 1F1B schedule (model-parallel groups already up).

    Returns, on every rank, per step: the global loss (last stage, else None), the
    `StepResult`, and this stage's full weights at the end. ``inject_inf_at``: the step at
    which global rank 5 (only) finds an inf in one gradient."""
    chunks = [DistributedDataParallel(c, ddp) for c in build_model_chunks(model_config)]
    optimizer = build_optimizer(opt, chunks)
    dp_rank, dp_group = parallel_state.get_data_parallel_rank(), chunks[0].data_parallel_group
    local = GLOBAL_BATCH // DP
    losses, results = [], []
    for step, (inputs, labels) in enumerate(step_batches):
        rows = slice(dp_rank * local, (dp_rank + 1) * local)
        micro = list(
            zip(inputs[rows].split(MICRO_BATCH), labels[rows].split(MICRO_BATCH), strict=True)
        )
        optimizer.zero_grad()
        logged = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks, num_microbatches=len(micro), seq_length=SEQ,
            micro_batch_size=MICRO_BATCH, no_sync_func=[c.no_sync for c in chunks],
            grad_sync_func=[c.start_grad_sync for c in chunks],
            finalize_model_grads_func=finalize_model_grads, grad_scale_func=optimizer.scale_loss,
        )  # fmt: skip
        if step == inject_inf_at and dist.get_rank() == 5:
            # After the reduction, in this rank's own slice: only this rank can see it.
            optimizer.shards[0].main_grad[0] = float("inf")
        results.append(optimizer.step())
        if logged:
            total = torch.stack(logged).mean().reshape(1)
            dist.all_reduce(total, group=dp_group)
            losses.append(total.item() / DP)
    for chunk in chunks:
        chunk.finish_param_sync()
    weights = {}
    for chunk in chunks:
        weights.update(gather_full_state(chunk.module))
    return {
        "losses": losses,
        "results": results,
        "weights": weights,
        "skipped": optimizer.skipped_steps,
    }


def merge_stages(per_rank: list[dict], tied: bool) -> dict:
    """Losses from the last stage, norms from rank 0, weights from TP=0/DP=0 of each stage."""
    first, last = per_rank[0], per_rank[-1]
    weights = {**first["weights"], **last["weights"]}
    if tied:  # the last stage's copy of the embedding must have stayed equal to the original
        torch.testing.assert_close(
            weights.pop("output_layer.weight"), first["weights"]["embedding.weight"]
        )
    return {
        "losses": last["losses"],
        "norms": [r.grad_norm for r in first["results"]],
        "weights": weights,
    }


def parity_3d_run(
    model_config: ModelConfig, ddp: DistributedDataParallelConfig, vpp: int | None = None
) -> dict:
    opt = optimizer_config()
    reference = reference_on_rank0(model_config, opt)
    parallel_state.initialize_model_parallel(TP, PP, vpp)
    try:
        run = pipeline_training(model_config, ddp, opt, batches(model_config.vocab_size, STEPS))
    finally:
        parallel_state.destroy_model_parallel()
    return {"reference": reference, **run}


@pytest.mark.parametrize(
    "distributed, tied, sequence_parallel, vpp",
    [(False, False, True, None), (True, True, True, None), (True, False, False, 2)],
)
def test_tp2_pp2_dp2_matches_single_process(pool, distributed, tied, sequence_parallel, vpp):
    """vpp=2: interleaved schedule, two model chunks per rank (4 layers)."""
    config = ModelConfig.from_preset(
        "tiny", tie_word_embeddings=tied, sequence_parallel=sequence_parallel,
        num_layers=4 if vpp else 2,
    )  # fmt: skip
    ddp = DistributedDataParallelConfig(
        overlap_grad_reduce=True, use_distributed_optimizer=distributed,
        overlap_param_gather=distributed, bucket_size=30_000,
    )  # fmt: skip
    per_rank = pool.run(parity_3d_run, config, ddp, vpp)
    reference = per_rank[0]["reference"]
    assert_same_training(reference, merge_stages(per_rank, tied), f"TP2xPP2xDP2 vpp={vpp} {ddp}")
    for rank, result in enumerate(per_rank):  # every rank clipped with the same global norm
        norms = torch.tensor([r.grad_norm for r in result["results"]])
        torch.testing.assert_close(
            norms, torch.tensor(reference["norms"]), rtol=1e-5, atol=0, msg=f"rank {rank}"
        )


# Mixed precision ----------------------------------------------------------------------------


def precision_run(
    dtype: torch.dtype, steps: int, inject_inf_at: int | None, **opt_overrides
) -> dict:
    """Train on one repeated batch (so the loss falls) in ``dtype`` under TP2 x PP2 x DP2."""
    config = ModelConfig.from_preset("tiny", params_dtype=dtype)
    opt = optimizer_config(lr=3e-3, **opt_overrides)
    ddp = DistributedDataParallelConfig(overlap_grad_reduce=True, use_distributed_optimizer=True)
    parallel_state.initialize_model_parallel(TP, PP)
    try:
        data = batches(config.vocab_size, 1) * steps
        return pipeline_training(config, ddp, opt, data, inject_inf_at)
    finally:
        parallel_state.destroy_model_parallel()


def test_fp16_inf_skips_the_step_lowers_the_scale_and_training_continues(pool):
    per_rank = pool.run(
        precision_run, torch.float16, 6, 2, fp16=True, initial_loss_scale=2.0**12, hysteresis=1
    )
    for rank, result in enumerate(per_rank):
        updated = [r.updated for r in result["results"]]
        scales = [r.loss_scale for r in result["results"]]
        assert updated == [True, True, False, True, True, True], f"rank {rank}: {updated}"
        assert scales == [2.0**12] * 2 + [2.0**11] * 4, f"rank {rank}: {scales}"
        assert result["skipped"] == 1
        assert "inf/nan" in result["results"][2].skip_reason
    losses = per_rank[-1]["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    assert per_rank[0]["weights"].keys() and all(
        torch.isfinite(w).all() for w in per_rank[0]["weights"].values()
    )


def test_non_finite_norm_skips_the_step_with_a_reason(pool):
    """fp32/bf16 have no loss scaler: a nan gradient shows as a non-finite global norm."""
    for rank, result in enumerate(pool.run(precision_run, torch.float32, 3, 1)):
        assert [r.updated for r in result["results"]] == [True, False, True], f"rank {rank}"
        assert "non-finite gradient norm" in result["results"][1].skip_reason
        assert result["skipped"] == 1


def test_bf16_tracks_fp32(pool):
    fp32 = pool.run(precision_run, torch.float32, 20, None)[-1]["losses"]
    bf16 = pool.run(precision_run, torch.bfloat16, 20, None, bf16=True)[-1]["losses"]
    fp32, bf16 = torch.tensor(fp32), torch.tensor(bf16)
    assert fp32[-1] < fp32[0] - 1.0  # the repeated batch is being learnt
    # bf16 keeps 8 bits of mantissa: loose agreement, the same curve.
    torch.testing.assert_close(bf16, fp32, rtol=0.03, atol=0.0)
    print(f"loss after 20 steps: fp32 {fp32[-1]:.4f}, bf16 {bf16[-1]:.4f}")


# Our AdamW against torch.optim.AdamW -------------------------------------------------------


def adamw_run(sharded_layout: bool) -> float:
    """5 steps on identical gradients: our optimizer (fp32 main params over the gradient
    buffer, fused/foreach AdamW, no decay on norms) vs torch.optim.AdamW on a copy, both
    driven by the same LR / weight-decay schedule (warm-up, cosine, rising decay)."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        solo = data_parallel_subgroup(1)
        config = ModelConfig.from_preset("tiny")
        opt = OptimizerConfig(
            lr=1e-2, min_lr=1e-3, clip_grad=0.0, lr_decay_style="cosine", lr_warmup_iters=2,
            start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_style="linear",
        )  # fmt: skip
        ddp = DistributedDataParallelConfig(
            use_distributed_optimizer=sharded_layout, bucket_size=20_000
        )
        model = DistributedDataParallel(LlamaModel(config), ddp, solo)
        ours = build_optimizer(opt, [model])
        twin = LlamaModel(config)
        reference = torch_adamw(twin, opt)
        schedules = [build_lr_scheduler(o, opt, train_iters=6) for o in (ours, reference)]
        for inputs, labels in batches(config.vocab_size, 5):
            for schedule in schedules:
                schedule.step(1)
            ours.zero_grad()
            reference.zero_grad()
            model(inputs, labels=labels).mean().backward()
            # The same gradients for both: Adam would amplify the rounding-level differences
            # of near-zero gradients computed from slightly different weights.
            for mine, theirs in zip(model.module.parameters(), twin.parameters(), strict=True):
                theirs.grad = mine.main_grad.clone()
            assert ours.step().updated
            reference.step()
        mine, theirs = gather_full_state(model.module), gather_full_state(twin)
        return max(
            ((mine[n] - theirs[n]).abs().max() / theirs[n].abs().max()).item() for n in theirs
        )
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("sharded_layout", [False, True])
def test_our_adamw_equals_torch_adamw(pool, sharded_layout):
    worst = max(pool.run(adamw_run, sharded_layout))
    assert worst < 1e-6, worst
    print(f"our AdamW vs torch.optim.AdamW, sharded={sharded_layout}: worst {worst:.2e}")
