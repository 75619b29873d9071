"""Pipeline schedules against the single-process model, on real gloo ranks.

Every layout runs the same microbatches through `get_forward_backward_func()`; each
microbatch's per-token losses and every parameter's gradient (gathered to full canonical
tensors, merged over stages and chunks) must equal a plain single-process gradient-accumulation
loop within 1e-5 relative in float32. The schedule's recorder also checks the activation
bound: 1F1B keeps at most ``p - r`` microbatches in flight on rank r.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist

from engine import parallel_state
from engine.distributed import finalize_model_grads
from engine.models import LlamaModel, ModelConfig
from engine.models.build import build_model_chunks
from engine.models.weights import gather_full_state
from engine.pipeline_parallel.schedules import (
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)
from engine.pipeline_parallel.timeline import ScheduleRecorder
from tests.rank_pool import module_pool

MICRO_BATCH, SEQ = 2, 16


pool = module_pool(4)


def _microbatches(vocab_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab_size, (count, MICRO_BATCH, SEQ + 1), generator=generator)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def forward_step(data_iterator, model):
    """The forward-step function a training loop gives the schedule."""
    inputs, labels = next(data_iterator)
    losses = model(inputs, labels=labels)  # [b, s] on the last stage, hidden states elsewhere
    return losses, lambda out: (out.mean(), out.detach())


def _full_grads(chunks: list) -> dict[str, torch.Tensor]:
    grads = {}
    for chunk in chunks:
        grads.update(gather_full_state(chunk, grads=True))
    return grads


def reference_run(config: ModelConfig, num_microbatches: int) -> dict:
    """Plain gradient accumulation on one stage: losses per microbatch and full gradients."""
    parallel_state.initialize_model_parallel()
    try:
        # One stage holds every layer: an uneven pipeline split does not apply.
        model = LlamaModel(
            dataclasses.replace(
                config,
                decoder_first_pipeline_num_layers=None,
                decoder_last_pipeline_num_layers=None,
            )
        )
        losses = []
        for inputs, labels in _microbatches(config.vocab_size, num_microbatches):
            loss = model(inputs, labels=labels)
            (loss.mean() / num_microbatches).backward()
            losses.append(loss.detach())
        return {"losses": losses, "grads": _full_grads([model])}
    finally:
        parallel_state.destroy_model_parallel()


def pipeline_run(
    config: ModelConfig,
    tp: int,
    pp: int,
    vpp: int | None,
    microbatch_counts: list[int],
) -> list[dict]:
    """Reference and pipelined runs for each microbatch count, on every rank."""
    references = {m: reference_run(config, m) for m in microbatch_counts}
    parallel_state.initialize_model_parallel(tp, pp, vpp)
    try:
        results = []
        for m in microbatch_counts:
            chunks = build_model_chunks(config)
            batches = _microbatches(config.vocab_size, m)
            recorder = ScheduleRecorder(rank=dist.get_rank())
            losses = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=[iter(batches) for _ in chunks] if vpp else iter(batches),
                model=chunks,
                num_microbatches=m,
                seq_length=SEQ,
                micro_batch_size=MICRO_BATCH,
                finalize_model_grads_func=finalize_model_grads,
                recorder=recorder,
            )
            results.append(
                {
                    "m": m,
                    "reference": references[m],
                    "losses": losses,
                    "grads": _full_grads(chunks),
                    "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                    "dp_rank": parallel_state.get_data_parallel_rank(),
                    "peak_in_flight": recorder.peak_in_flight,
                    "final_in_flight": recorder.in_flight,
                }
            )
        return results
    finally:
        parallel_state.destroy_model_parallel()


def check_parity(per_rank: list[list[dict]], pp: int, what: str) -> None:
    for index, reference_result in enumerate(per_rank[0]):
        m, reference = reference_result["m"], reference_result["reference"]
        ranks = [results[index] for results in per_rank if results[index]["dp_rank"] == 0]
        last = [r for r in ranks if r["pp_rank"] == pp - 1]
        for r in last:
            assert len(r["losses"]) == m, f"{what} m={m}"
            for got, expected in zip(r["losses"], reference["losses"], strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        assert all(r["losses"] == [] for r in ranks if r["pp_rank"] != pp - 1)
        merged = {}
        for r in ranks:
            merged.update(r["grads"])
        tied_head = merged.pop("output_layer.weight", None) if pp > 1 else None
        if "output_layer.weight" not in reference["grads"] and tied_head is not None:
            # The last stage's copy of a tied embedding got the summed gradient as well.
            merged["tied output_layer.weight"] = tied_head
            reference["grads"]["tied output_layer.weight"] = reference["grads"]["embedding.weight"]
        elif tied_head is not None:
            merged["output_layer.weight"] = tied_head
        assert merged.keys() == reference["grads"].keys(), what
        for name, expected in reference["grads"].items():
            scale = expected.abs().max().item()
            torch.testing.assert_close(
                merged[name], expected, rtol=1e-5, atol=1e-5 * scale, msg=f"{what} m={m}: {name}"
            )


def check_1f1b_bound(per_rank: list[list[dict]], pp: int) -> None:
    for results in per_rank:
        for r in results:
            assert r["final_in_flight"] == 0
            assert r["peak_in_flight"] == min(pp - r["pp_rank"], r["m"]), r


LAYERS4 = ModelConfig.from_preset("tiny", num_layers=4)


@pytest.mark.parametrize(
    "config, tp, pp",
    [
        (LAYERS4, 1, 2),  # with 2 data-parallel replicas
        (LAYERS4, 1, 4),
        (ModelConfig.from_preset("tiny-gqa", num_layers=4, sequence_parallel=True), 2, 2),
    ],
    ids=["pp2", "pp4", "tp2-sp-pp2"],
)
def test_1f1b_matches_single_process(pool, config, tp, pp):
    per_rank = pool.run(pipeline_run, config, tp, pp, None, [1, pp, 2 * pp + 1])
    check_parity(per_rank, pp, f"tp={tp} pp={pp}")
    check_1f1b_bound(per_rank, pp)


def test_no_pipelining_matches_single_process(pool):
    config = ModelConfig.from_preset("tiny", sequence_parallel=True)
    per_rank = pool.run(pipeline_run, config, 2, 1, None, [1, 3])
    check_parity(per_rank, 1, "tp=2 pp=1")


def check_interleaved_bound(per_rank: list[list[dict]], pp: int, vpp: int) -> None:
    """Interleaved 1F1B keeps its warm-up forwards plus one in flight (Megatron's warm-up:
    ``2·(p - r - 1) + (v - 1)·p``, or everything when m = p)."""
    for results in per_rank:
        for r in results:
            m, total = r["m"], r["m"] * vpp
            warmup = total if m == pp else min((pp - r["pp_rank"] - 1) * 2 + (vpp - 1) * pp, total)
            assert r["final_in_flight"] == 0
            assert r["peak_in_flight"] == min(warmup + 1, total), r


@pytest.mark.parametrize(
    "config, tp",
    [
        (LAYERS4, 1),
        (ModelConfig.from_preset("tiny-gqa", num_layers=4, sequence_parallel=True), 2),
    ],
    ids=["pp2-v2", "tp2-sp-pp2-v2"],
)
def test_interleaved_matches_single_process(pool, config, tp):
    per_rank = pool.run(pipeline_run, config, tp, 2, 2, [2, 4, 6])
    check_parity(per_rank, 2, f"tp={tp} pp=2 v=2")
    check_interleaved_bound(per_rank, 2, 2)


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_tied_embeddings_under_pipelining(pool, vpp):
    config = ModelConfig.from_preset("tiny", num_layers=4, tie_word_embeddings=True)
    per_rank = pool.run(pipeline_run, config, 1, 2, vpp, [2])
    check_parity(per_rank, 2, f"tied pp=2 v={vpp}")


def test_uneven_first_and_last_stages(pool):
    # 7 layers over 4 stages as 1 | 2 | 2 | 2: only the explicit first/last counts allow it.
    config = ModelConfig.from_preset(
        "tiny",
        num_layers=7,
        decoder_first_pipeline_num_layers=1,
        decoder_last_pipeline_num_layers=2,
    )
    per_rank = pool.run(pipeline_run, config, 1, 4, None, [4])
    check_parity(per_rank, 4, "pp=4 first=1 last=2")


def hooks_run(vpp: int | None, m: int) -> dict:
    """Record, per parameter, whether gradient sync was enabled at each accumulation."""
    config = ModelConfig.from_preset("tiny", num_layers=4)
    parallel_state.initialize_model_parallel(1, 2, vpp)
    try:
        chunks = build_model_chunks(config)
        sync = {"enabled": True}
        seen: dict[str, list[bool]] = {}
        for index, chunk in enumerate(chunks):
            for name, param in chunk.named_parameters():
                key = f"{index}.{name}"
                seen[key] = []
                param.register_post_accumulate_grad_hook(
                    lambda _p, key=key: seen[key].append(sync["enabled"])
                )

        @contextlib.contextmanager
        def no_sync():
            sync["enabled"] = False
            try:
                yield
            finally:
                sync["enabled"] = True

        synced_chunks, finalized = [], []

        def grad_sync(params):
            params = list(params)
            synced_chunks.append(next(i for i, c in enumerate(chunks)
                                      if list(c.parameters())[0] is params[0]))  # fmt: skip

        batches = _microbatches(config.vocab_size, m)
        get_forward_backward_func()(
            forward_step, [iter(batches) for _ in chunks] if vpp else iter(batches), chunks,
            m, SEQ, MICRO_BATCH,
            no_sync_func=no_sync, grad_sync_func=grad_sync,
            finalize_model_grads_func=lambda model: finalized.append(sync["enabled"]),
        )  # fmt: skip
        return {"seen": seen, "synced": synced_chunks, "finalized": finalized}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_grad_sync_only_in_last_microbatch_backward(pool, vpp):
    m = 4
    for result in pool.run(hooks_run, vpp, m):
        for key, flags in result["seen"].items():
            assert flags == [False] * (m - 1) + [True], key
        assert sorted(result["synced"]) == list(range(2 if vpp else 1))
        assert result["finalized"] == [True]


def errors_run() -> list[str]:
    parallel_state.initialize_model_parallel(1, 2, 2)
    messages = []
    try:
        config = ModelConfig.from_preset("tiny", num_layers=4)
        chunks = build_model_chunks(config)
        batches = _microbatches(config.vocab_size, 3)
        with pytest.raises(ValueError, match=r"--num-microbatches \(3\).*multiple of") as error:
            forward_backward_pipelining_with_interleaving(
                forward_step, [iter(batches)] * 2, chunks, 3, SEQ, MICRO_BATCH
            )
        messages.append(str(error.value))
        with pytest.raises(ValueError, match="one model chunk, got 2"):
            forward_backward_pipelining_without_interleaving(
                forward_step, iter(batches), chunks, 2, SEQ, MICRO_BATCH
            )
        with pytest.raises(ValueError, match=r"--num-layers \(6\).*x virtual pipeline size"):
            build_model_chunks(ModelConfig.from_preset("tiny", num_layers=6))
    finally:
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 4)
    try:
        config = ModelConfig.from_preset("tiny", num_layers=4)
        (chunk,) = build_model_chunks(config)
        batches = _microbatches(config.vocab_size, 2)
        with pytest.warns(UserWarning, match=r"--num-microbatches \(2\) is smaller than"):
            forward_backward_pipelining_without_interleaving(
                forward_step, iter(batches), [chunk], 2, SEQ, MICRO_BATCH
            )
    finally:
        parallel_state.destroy_model_parallel()
    return messages


def test_clear_errors(pool):
    pool.run(errors_run)


def deallocation_run(vpp: int | None) -> tuple[int, list[int]]:
    """Sizes, after the step, of the outputs every forward produced on this rank."""
    parallel_state.initialize_model_parallel(1, 2, vpp)
    try:
        config = ModelConfig.from_preset("tiny", num_layers=4)
        chunks = build_model_chunks(config)
        outputs = []

        def keeping_forward_step(data_iterator, model):
            output, loss_func = forward_step(data_iterator, model)
            outputs.append(output)
            return output, loss_func

        batches = _microbatches(config.vocab_size, 4)
        get_forward_backward_func()(
            keeping_forward_step, [iter(batches) for _ in chunks] if vpp else iter(batches),
            chunks, 4, SEQ, MICRO_BATCH,
        )  # fmt: skip
        return parallel_state.get_pipeline_model_parallel_rank(), [o.numel() for o in outputs]
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_sent_outputs_are_deallocated(pool, vpp):
    hidden_states = SEQ * MICRO_BATCH * LAYERS4.hidden_size
    for pp_rank, sizes in pool.run(deallocation_run, vpp):
        if vpp is None and pp_rank == 1:  # the last stage keeps its losses [b, s]
            assert sizes == [MICRO_BATCH * SEQ] * 4
        elif vpp is None:
            assert sizes == [1] * 4, f"hidden states [s, b, h] ({hidden_states}) not freed"
        else:  # chunk 0 sent downstream on both ranks; chunk 1 of rank 0 too
            assert sizes.count(1) == (8 if pp_rank == 0 else 4), sizes


def forward_only_run(vpp: int | None, m: int) -> dict:
    """Evaluation: losses without gradients or stored activations."""
    config = ModelConfig.from_preset("tiny", num_layers=4)
    reference = reference_run(config, m)
    parallel_state.initialize_model_parallel(1, 2, vpp)
    try:
        chunks = build_model_chunks(config)
        batches = _microbatches(config.vocab_size, m)
        recorder = ScheduleRecorder()
        with torch.no_grad():
            losses = get_forward_backward_func()(
                forward_step, [iter(batches) for _ in chunks] if vpp else iter(batches), chunks,
                m, SEQ, MICRO_BATCH, forward_only=True, recorder=recorder,
            )  # fmt: skip
        return {
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "losses": losses,
            "reference": reference["losses"],
            "grads": [p.grad for c in chunks for p in c.parameters() if p.grad is not None],
            "peak_in_flight": recorder.peak_in_flight,
        }
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("vpp, m", [(None, 3), (2, 4)], ids=["1f1b", "interleaved"])
def test_forward_only(pool, vpp, m):
    for r in pool.run(forward_only_run, vpp, m):
        assert r["grads"] == [] and r["peak_in_flight"] == 0
        if r["pp_rank"] == 1:
            for got, expected in zip(r["losses"], r["reference"], strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        else:
            assert r["losses"] == []


def data_parallel_run(vpp: int | None, m: int) -> dict:
    """PP=2 x DP=2 with each chunk in `DistributedDataParallel` (overlapped, small buckets),
    plugged in through the schedule's hooks; each DP replica takes its own m microbatches."""
    from engine.distributed.config import DistributedDataParallelConfig
    from engine.distributed.ddp import DistributedDataParallel

    config = ModelConfig.from_preset("tiny", num_layers=4, tie_word_embeddings=True)
    reference = reference_run(config, 2 * m)  # the mean over both replicas' microbatches
    parallel_state.initialize_model_parallel(1, 2, vpp)
    try:
        ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=20_000)
        chunks = [DistributedDataParallel(c, ddp_config) for c in build_model_chunks(config)]
        dp_rank = parallel_state.get_data_parallel_rank()
        batches = _microbatches(config.vocab_size, 2 * m)[dp_rank * m : (dp_rank + 1) * m]
        losses = get_forward_backward_func()(
            forward_step, [iter(batches) for _ in chunks] if vpp else iter(batches), chunks,
            m, SEQ, MICRO_BATCH,
            no_sync_func=[c.no_sync for c in chunks],
            grad_sync_func=[c.start_grad_sync for c in chunks],
            finalize_model_grads_func=finalize_model_grads,
        )  # fmt: skip
        for chunk in chunks:
            for param in chunk.module.parameters():
                param.grad = param.main_grad  # the DP-averaged gradient, for gathering
        return {
            "m": m,
            "reference": {
                "losses": reference["losses"][dp_rank * m : (dp_rank + 1) * m],
                "grads": reference["grads"],
            },  # fmt: skip
            "losses": losses,
            "grads": _full_grads([c.module for c in chunks]),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": dp_rank,
        }
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_data_parallel_wrapper_through_hooks(pool, vpp):
    per_rank = pool.run(data_parallel_run, vpp, 4)
    for dp_rank in range(2):  # each replica: its own losses, the DP-averaged gradients
        replica = [[{**r, "dp_rank": 0}] for r in per_rank if r["dp_rank"] == dp_rank]
        check_parity(replica, 2, f"pp=2 dp=2 ddp v={vpp} replica {dp_rank}")
