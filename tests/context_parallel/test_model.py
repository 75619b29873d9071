"""The model under context parallelism against one process, on 8 real gloo ranks.

Every layout splits the same microbatches' sequences over CP (each DP replica takes its own
microbatches) and runs them through the pipeline schedule with the engine's forward step and
DDP over DP x CP; the per-microbatch losses (averaged over the CP ranks, as the trainer does),
the logits of each rank's chunks and every parameter's gradient (gathered to full tensors)
equal a plain single-process gradient-accumulation loop within 1e-5 (float32). The loss mask
has holes, so the loss must be the mean over the whole sequence, not over each chunk.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import parallel_state
from engine.context_parallel import split_batch, split_sequence
from engine.distributed import DistributedDataParallel, finalize_model_grads
from engine.distributed.config import DistributedDataParallelConfig
from engine.models import LlamaModel, ModelConfig
from engine.models.build import build_model_chunks
from engine.models.weights import gather_full_state
from engine.pipeline_parallel.schedules import get_forward_backward_func
from engine.training.step import forward_step
from engine.wrappers import unwrap
from tests.rank_pool import module_pool

pool = module_pool(8)

MICRO_BATCH, SEQ, MICROBATCHES = 2, 16, 2

# 8 query heads over 4 K/V heads: grouped-query attention that a2a can split at CP=4.
GQA = ModelConfig.from_preset(
    "tiny", num_attention_heads=8, num_query_groups=4, num_layers=4, attention_backend="torch",
    norm_backend="torch",
)  # fmt: skip


def _packed_documents(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``document_ids`` and the positions restarting in each document, ``[b, s]``: 1-6
    documents a row, so they cross chunk (and CP rank) boundaries."""
    ids = torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long)
    positions = torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long)
    for row in range(MICRO_BATCH):
        cuts = torch.randperm(SEQ - 1, generator=generator)[: row * 3 + 2].sort().values + 1
        for start in cuts.tolist():
            ids[row, start:] += 1
        for doc in ids[row].unique().tolist():
            where = (ids[row] == doc).nonzero()[:, 0]
            positions[row, where] = torch.arange(len(where))
    return ids, positions


def _batches(config: ModelConfig, count: int, documents: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, config.vocab_size, (MICRO_BATCH, SEQ + 1), generator=generator)
        mask = (torch.rand(MICRO_BATCH, SEQ, generator=generator) > 0.3).float()
        batch = {
            "tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
        }  # fmt: skip
        if documents:
            batch["document_ids"], batch["position_ids"] = _packed_documents(generator)
        out.append(batch)
    return out


def _documents(batch: dict) -> dict:
    return {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}


def _reference(config: ModelConfig, batches: list[dict]) -> dict:
    """One process, one stage: per-microbatch losses, logits and the mean loss's gradients."""
    parallel_state.initialize_model_parallel()
    try:
        model = LlamaModel(dataclasses.replace(config, sequence_parallel=False))
        losses = []
        for batch in batches:
            per_token = model(batch["tokens"], position_ids=batch["position_ids"],
                              labels=batch["labels"], **_documents(batch))  # fmt: skip
            mask = batch["loss_mask"]
            loss = (per_token * mask).sum() / mask.sum()
            (loss / len(batches)).backward()
            losses.append(loss.detach())
        with torch.no_grad():
            logits = [model(batch["tokens"], position_ids=batch["position_ids"],
                            **_documents(batch)) for batch in batches]  # fmt: skip
        return {"losses": losses, "logits": logits, "grads": gather_full_state(model, grads=True)}
    finally:
        parallel_state.destroy_model_parallel()


def cp_run(
    config: ModelConfig, tp: int, pp: int, cp: int, vpp: int | None = None, documents: bool = False
) -> dict:
    """Reference and CP runs on every rank; DP = 8 / (TP x PP x CP) replicas."""
    dp = 8 // (tp * pp * cp)
    batches = _batches(config, dp * MICROBATCHES, documents)
    reference = _reference(config, batches)
    parallel_state.initialize_model_parallel(tp, pp, vpp, context_parallel_size=cp)
    try:
        ps = parallel_state
        ddp = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=20_000)
        chunks = [DistributedDataParallel(c, ddp) for c in build_model_chunks(config)]
        dp_rank, cp_rank = ps.get_data_parallel_rank(), ps.get_context_parallel_rank()
        mine = batches[dp_rank * MICROBATCHES : (dp_rank + 1) * MICROBATCHES]
        local = [split_batch(batch, cp_rank, cp) for batch in mine]
        losses = get_forward_backward_func()(
            forward_step, [iter(local) for _ in chunks] if vpp else iter(local), chunks,
            MICROBATCHES, SEQ, MICRO_BATCH,
            no_sync_func=[c.no_sync for c in chunks],
            grad_sync_func=[c.start_grad_sync for c in chunks],
            finalize_model_grads_func=finalize_model_grads,
        )  # fmt: skip
        for chunk in chunks:
            for param in chunk.module.parameters():
                param.grad = param.main_grad  # averaged over DP x CP, for gathering
        result = {
            "losses": [float(loss) for loss in losses],
            "reference_losses": [float(loss) for loss in reference["losses"]],
            "grads": {
                name: grad
                for chunk in chunks
                for name, grad in gather_full_state(unwrap(chunk), grads=True).items()
            },
            "reference_grads": reference["grads"],
            "dp": dp_rank, "tp": ps.get_tensor_model_parallel_rank(),
            "last": ps.is_pipeline_last_stage(ignore_virtual=True),
            "logits_error": None,
        }  # fmt: skip
        if pp == 1:  # the logits of this rank's chunks and vocabulary slice
            with torch.no_grad():
                logits = chunks[0](local[0]["tokens"], position_ids=local[0]["position_ids"],
                                   **_documents(local[0]))  # fmt: skip
            expected = split_sequence(reference["logits"][dp_rank * MICROBATCHES], 1, cp_rank, cp)
            width = logits.size(-1)
            expected = expected[..., result["tp"] * width : (result["tp"] + 1) * width]
            result["logits_error"] = (logits - expected).abs().max().item()
        return result
    finally:
        parallel_state.destroy_model_parallel()


def check(per_rank: list[dict], cp: int, what: str) -> None:
    """Losses: each replica's microbatches, CP ranks averaged; gradients: every stage's."""
    for dp in {r["dp"] for r in per_rank}:
        last = [r for r in per_rank if r["dp"] == dp and r["tp"] == 0 and r["last"]]
        assert len(last) == cp, what
        got = torch.tensor([r["losses"] for r in last], dtype=torch.float64).mean(0)
        expected = torch.tensor(last[0]["reference_losses"], dtype=torch.float64)
        expected = expected[dp * MICROBATCHES : (dp + 1) * MICROBATCHES]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0, msg=what)
    for r in per_rank:
        if r["logits_error"] is not None:
            assert r["logits_error"] < 1e-5, (what, r["logits_error"])
        for name, grad in r["grads"].items():
            if name not in r["reference_grads"] and name == "output_layer.weight":
                name = "embedding.weight"  # the last stage's copy of a tied embedding
            expected = r["reference_grads"][name]
            scale = expected.abs().max().item()
            torch.testing.assert_close(
                grad, expected, rtol=1e-5, atol=1e-5 * scale, msg=f"{what}: {name}"
            )
    covered = set().union(*(r["grads"] for r in per_rank))
    assert set(per_rank[0]["reference_grads"]) <= covered, what


LAYOUTS = {  # name: (tp, pp, cp, vpp, model overrides); DP fills the 8 ranks
    "cp2-dp4": (1, 1, 2, None, {}),
    "cp4-dp2": (1, 1, 4, None, {}),
    "cp2-tp2-sp-dp2": (2, 1, 2, None, {"sequence_parallel": True}),
    "cp2-pp2-dp2": (1, 2, 2, None, {}),
    "cp2-tp2-pp2": (2, 2, 2, None, {"sequence_parallel": True}),
}


@pytest.mark.parametrize("comm", ["p2p", "a2a"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_context_parallel_model_equals_one_process(pool, layout, comm):
    tp, pp, cp, vpp, overrides = LAYOUTS[layout]
    config = dataclasses.replace(GQA, cp_comm_type=comm, **overrides)
    check(pool.run(cp_run, config, tp, pp, cp, vpp), cp, f"{layout} {comm}")


def test_interleaved_pipeline_with_a_tied_embedding(pool):
    """CP2 x PP2 with two model chunks per pipeline rank (p2p messages are the local
    chunk's ``[s/cp, b, h]``) and a tied embedding."""
    config = dataclasses.replace(GQA, tie_word_embeddings=True)
    check(pool.run(cp_run, config, 1, 2, 2, 2), 2, "cp2 pp2 vpp2 tied")


@pytest.mark.parametrize("comm, cp", [("p2p", 4), ("a2a", 2)])
def test_packed_documents_stay_apart_across_chunks(pool, comm, cp):
    """SFT packing / --reset-attention-mask: documents cross chunk and rank boundaries; each
    rank masks attention by the whole sequence's document ids (with TP2 and SP; a2a at CP2:
    2 K/V heads per TP rank)."""
    config = dataclasses.replace(GQA, cp_comm_type=comm, sequence_parallel=True)
    check(pool.run(cp_run, config, 2, 1, cp, None, True), cp, f"cp{cp} tp2 documents {comm}")


def one_document_at_a_time() -> float:
    """The largest difference between a packed row's per-token losses and those of each of its
    documents run alone (positions from 0), one process."""
    parallel_state.initialize_model_parallel()
    try:
        model = LlamaModel(GQA)
        batch = _batches(GQA, 1, documents=True)[0]
        packed = model(batch["tokens"], position_ids=batch["position_ids"],
                       labels=batch["labels"], document_ids=batch["document_ids"])  # fmt: skip
        worst = 0.0
        for row in range(MICRO_BATCH):
            for doc in batch["document_ids"][row].unique().tolist():
                where = (batch["document_ids"][row] == doc).nonzero()[:, 0]
                alone = model(batch["tokens"][row, where][None],
                              labels=batch["labels"][row, where][None])  # fmt: skip
                worst = max(worst, (alone[0] - packed[row, where]).abs().max().item())
        return worst
    finally:
        parallel_state.destroy_model_parallel()


def test_a_packed_row_equals_its_documents_run_alone(pool):
    assert pool.run(one_document_at_a_time)[0] < 1e-5


def test_selective_recompute_redoes_the_ring(pool):
    """Selective recompute re-runs core attention, ring communication included, in backward."""
    config = dataclasses.replace(GQA, recompute_granularity="selective")
    check(pool.run(cp_run, config, 1, 1, 4), 4, "cp4 selective")


def test_full_recompute_with_all_to_all(pool):
    config = dataclasses.replace(GQA, recompute_granularity="full", cp_comm_type="a2a")
    check(pool.run(cp_run, config, 2, 1, 2), 2, "cp2 tp2 full a2a")
