"""The plan's arithmetic: LLaMA-2-7B figures, per-rank parameters against the meta-device model
on 8 real ranks, the activation formula against DESIGN.md's closed forms and against what a
layer really saves for backward, pipeline in-flight counts, and the memory verdict."""

from __future__ import annotations

import pytest
import torch

from engine import parallel_state
from engine.context_parallel import split_sequence
from engine.models import LlamaModel
from engine.models.config import ModelConfig
from engine.models.llama.model import DecoderLayer, RotaryEmbedding
from engine.planning.cost_model import (
    GB,
    activation_bytes_per_layer,
    communication_bytes,
    context_parallel_bytes,
    flops_per_token,
    format_plan,
    in_flight_microbatches,
    layer_parameters,
    plan,
    rank_parameters,
)
from engine.training.arguments import parse_args
from tests.rank_pool import module_pool
from tools.plan import main as plan_main

pool = module_pool(8)

# The layout docs/plan.md works through: LLaMA-2-7B, TP=8, PP=1, DP=4, bf16, ZeRO-1.
SEVEN_B = (
    "--model-preset llama2-7b --tensor-model-parallel-size 8 --bf16 --use-distributed-optimizer "
    "--micro-batch-size 1 --global-batch-size 256 --seq-length 4096 --sequence-parallel "
    "--recompute-granularity selective"
).split()


def test_7b_parameters_and_flops():
    model = ModelConfig.from_preset("llama2-7b")
    assert model.num_parameters() == 6_738_415_616
    assert sum(rank_parameters(model, 1, 1)) == 6_738_415_616
    # DESIGN.md: 42.9 GFLOP/token at S=2048 and 46.1 at S=4096.
    assert round(flops_per_token(model, 2048) / 1e9, 1) == 42.9
    assert round(flops_per_token(model, 4096) / 1e9, 1) == 46.1
    assert rank_parameters(model, 8, 1) == [843_321_344]


def count_stage_on_meta(preset: str, tp: int, pp: int, overrides: dict) -> tuple[int, int]:
    """(pipeline rank, parameters of this rank's stage built on the meta device)."""
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        config = ModelConfig.from_preset(preset, **overrides)
        with torch.device("meta"):
            model = LlamaModel(config)
        count = sum(p.numel() for p in model.parameters())
        return parallel_state.get_pipeline_model_parallel_rank(), count
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize(
    "preset, tp, pp, overrides",
    [
        ("llama2-7b", 8, 1, {}),
        ("llama2-7b", 2, 4, {}),
        ("llama2-70b", 8, 1, {}),  # 8 K/V heads over 8 ranks
        ("tiny-gqa", 4, 2, {}),  # 2 K/V heads over 4 ranks: replicated
        ("tiny", 2, 4, {"tie_word_embeddings": True, "num_layers": 8}),  # tied, copy on last
        ("tiny", 1, 8, {"num_layers": 12, "decoder_first_pipeline_num_layers": 5}),
    ],
)
def test_rank_parameters_equal_the_meta_model(pool, preset, tp, pp, overrides):
    expected = rank_parameters(ModelConfig.from_preset(preset, **overrides), tp, pp)
    for stage, count in pool.run(count_stage_on_meta, preset, tp, pp, overrides):
        assert count == expected[stage], (stage, count, expected)


def measure_saved_bytes(preset: str, tp: int, overrides: dict, cp: int = 1) -> int:
    """Bytes one decoder layer saves for backward (rank 0's), parameters and rotary tables
    excluded, with the torch backends in float32; s=32 (s/cp on each CP rank), b=2."""
    parallel_state.initialize_model_parallel(tp, context_parallel_size=cp)
    try:
        config = ModelConfig.from_preset(
            preset, attention_backend="torch", norm_backend="torch", **overrides
        )
        torch.manual_seed(0)
        layer = DecoderLayer(config, 0)
        s, b = 32, 2
        positions = split_sequence(torch.arange(s), 0)  # this CP rank's chunks
        s_local = len(positions) // tp if config.sequence_parallel else len(positions)
        x = torch.randn(s_local, b, config.hidden_size, requires_grad=True)
        cos, sin = RotaryEmbedding(config.head_dim, config.rotary_base)(
            positions.expand(b, -1), torch.float32
        )
        excluded = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), cos, sin)}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if config.recompute_granularity == "full":
                from engine.tensor_parallel.random import checkpoint

                checkpoint(layer, x, cos, sin)
            else:
                layer(x, cos, sin)
        return sum(saved.values())
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize(
    "preset, tp, overrides",
    [
        ("tiny", 1, {}),
        ("tiny", 1, {"recompute_granularity": "selective"}),
        ("tiny", 1, {"recompute_granularity": "full"}),
        ("tiny", 2, {}),
        ("tiny", 2, {"sequence_parallel": True}),
        ("tiny-gqa", 2, {"sequence_parallel": True}),
        ("tiny-gqa", 4, {}),  # replicated K/V
        ("tiny-gqa", 4, {"sequence_parallel": True}),
    ],
)
def test_activation_formula_matches_what_a_layer_saves(pool, preset, tp, overrides):
    check_saved_bytes(pool, preset, tp, overrides)


def check_saved_bytes(pool, preset: str, tp: int, overrides: dict, cp: int = 1) -> int:
    """The measured bytes equal the plan's formula; returns them."""
    measured = pool.run(measure_saved_bytes, preset, tp, overrides, cp)[0]
    config = ModelConfig.from_preset(preset, **overrides)
    formula = activation_bytes_per_layer(config, 32, 2, tp, bytes_per_value=4, cp=cp)
    # The plan counts the Triton RMSNorm, which keeps only its normalised input; the torch
    # reference used here also keeps the input itself (float32 already: no copy).
    sp = tp if config.sequence_parallel else 1
    reference_norm_extra = 0 if overrides.get("recompute_granularity") == "full" else 2
    assert measured == formula + reference_norm_extra * 32 // cp * 2 * 64 // sp * 4
    return measured


@pytest.mark.parametrize(
    "preset, tp, cp, overrides",
    [
        ("tiny", 1, 2, {}),
        ("tiny", 1, 4, {}),
        ("tiny-gqa", 2, 2, {"sequence_parallel": True}),
        ("tiny-gqa", 4, 2, {}),  # replicated K/V
        ("tiny", 1, 2, {"recompute_granularity": "selective"}),
        ("tiny", 1, 2, {"recompute_granularity": "full"}),
        ("tiny", 1, 2, {"cp_comm_type": "a2a"}),
        ("tiny", 2, 2, {"cp_comm_type": "a2a", "sequence_parallel": True}),
        ("tiny", 1, 4, {"cp_comm_type": "a2a", "recompute_granularity": "selective"}),
    ],
)
def test_activation_formula_under_context_parallelism(pool, preset, tp, cp, overrides):
    """Ring and all-to-all attention: what a layer saves on a CP rank equals the formula at
    ``s/cp`` byte for byte, and falls as 1/CP."""
    measured = check_saved_bytes(pool, preset, tp, overrides, cp)
    whole = pool.run(measure_saved_bytes, preset, tp, overrides, 1)[0]
    if overrides.get("cp_comm_type") != "a2a" and preset == "tiny":
        assert measured * cp == whole  # linear in the tokens: nothing else changes
    else:
        assert measured < whole


def test_activation_formula_against_design_closed_forms():
    """DESIGN.md's GPT forms, in bytes per layer with 16-bit values, next to ours."""
    s, b, h, a, f, t = 4096, 1, 4096, 32, 11008, 8
    sbh = s * b * h
    lse, rstd = 4 * s * b * a, 2 * 4 * s * b

    def ours(tp: int, **overrides: object) -> int:
        config = ModelConfig.from_preset("llama2-7b", **overrides)
        return activation_bytes_per_layer(config, s, b, tp)

    # No parallelism: GPT's 34·sbh + 5·a·s²·b becomes (14 + 6·g/a)·sbh + 8·sbf (g = a here):
    # no dropout masks, no s×s matrices, SwiGLU's f-wide tensors instead of GeLU's.
    assert ours(1) == 20 * sbh + 8 * s * b * f + lse + rstd
    gpt = 34 * sbh + 5 * a * s * s * b
    assert 4 < gpt / ours(1) < 5  # the s×s matrices dominate GPT's at s = 4096
    # TP: GPT's sbh·(10 + 24/t + 5·a·s/(h·t)); ours keeps 8·sbh replicated (norm and linear
    # inputs) and shards the rest: 12·sbh/t + 8·sbf/t.
    assert ours(t) == 8 * sbh + 12 * sbh // t + 8 * s * b * f // t + lse // t + rstd
    # TP + SP: the norm inputs and the column-parallel inputs shard too (kept as the sequence
    # shard and all-gathered again in the backward, as Megatron does): DESIGN's
    # (s·b·h/t)·(34 + 5·a·s/h) shape, everything divided by t.
    assert ours(t, sequence_parallel=True) == ours(t) - 8 * sbh * (t - 1) // t - rstd * (t - 1) // t
    assert ours(t, sequence_parallel=True) == ours(1) // t
    # Selective recompute of core attention saves only the log-sum-exp with flash attention.
    assert ours(t, recompute_granularity="selective") == ours(t) - lse // t
    # Full recompute: DESIGN's 2·sbh, and 2·sbh/t with sequence parallelism.
    assert ours(t, recompute_granularity="full") == 2 * sbh
    assert ours(t, recompute_granularity="full", sequence_parallel=True) == 2 * sbh // t


def test_in_flight_microbatches():
    # 1F1B: p on the first stage, one on the last, never more than the step has.
    assert [in_flight_microbatches(4, None, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches(4, None, 2, 0) == 2
    assert in_flight_microbatches(1, None, 64, 0) == 1
    # Interleaved: 2(p-1) + (v-1)p + 1 chunk forwards on the first rank, i.e. the
    # L/p·(1 + (p-1)/(p·v)) layers of Korthikanti et al. at p microbatches.
    p, v = 4, 2
    assert in_flight_microbatches(p, v, 16, 0) == 11
    assert 11 * (8 // v) == 32 // p * (1 + (p - 1) / (p * v)) * p
    assert in_flight_microbatches(p, v, 16, p - 1) == (v - 1) * p + 1


def test_7b_memory_at_tp8_dp4():
    job = parse_args(SEVEN_B + ["--device-memory-gb", "80"])
    result = plan(job, 32)
    (rank,) = result.ranks
    n = 843_321_344
    assert (result.data_parallel_size, result.num_microbatches) == (4, 64)
    assert rank.weight_bytes == 2 * n  # bf16
    assert rank.grad_bytes == 4 * n  # float32 DDP buffer
    assert rank.optimizer_bytes == 12 * n // 4  # main params + Adam moments, over DP
    s, h, f, t = 4096, 4096, 11008, 8
    per_layer = 2 * (2 * s * h // t + 2 * s * h // t + 6 * s * h // t + 4 * s * f // t) + 8 * s // t
    assert result.activation_bytes_per_layer == per_layer
    output = 2 * (2 * s * h // t) + 4 * s * 32768 // t
    assert rank.activation_bytes == 32 * per_layer + output
    assert rank.comm_bytes == 0  # no pipeline
    assert result.fits and 10 * GB < rank.total_bytes < 11 * GB
    assert result.flops_per_iteration == flops_per_token(job.model, s) * 256 * s
    text = format_plan(job, 32)
    assert "843,321,344" in text and "fits in 80 GB" in text and "46.1 GFLOP/token" in text


def test_communication_per_iteration():
    job = parse_args(SEVEN_B)
    n, s, h = 843_321_344, 4096, 4096
    sent = communication_bytes(job, 32)
    # TP: 4 ring all-reduces (2·7/8 of s·b·h bf16 values) per layer, 32 layers, 64 microbatches.
    assert sent["tensor"] == 4 * 2 * 7 * s * h // 8 * 2 * 32 * 64
    # ZeRO-1 over DP=4: reduce-scatter of float32 grads + all-gather of bf16 params, 3/4 each.
    assert sent["data"] == 3 * n * (4 + 2) // 4
    assert sent["pipeline"] == 0
    job.ddp.use_distributed_optimizer = False
    assert communication_bytes(job, 32)["data"] == 2 * 3 * n * 4 // 4
    job = parse_args(SEVEN_B + ["--pipeline-model-parallel-size", "2"])
    # DP = 2 now: 128 microbatches, each crossing one boundary each way, s·b·h/8 values.
    assert communication_bytes(job, 32)["pipeline"] == 2 * s * h // 8 * 2 * 128


def test_full_recompute_brings_one_layer_back():
    job = parse_args(SEVEN_B[:-2] + ["--recompute-granularity", "full"])
    stored = plan(job, 32)
    job.model.recompute_granularity = None
    not_recomputed = plan(job, 32)
    s, h, t = 4096, 4096, 8
    output = 2 * (2 * s * h // t) + 4 * s * 32768 // t
    assert stored.ranks[0].activation_bytes == (
        32 * 2 * s * h // t + not_recomputed.activation_bytes_per_layer + output
    )


def test_memory_verdict_and_optimizer_sharding():
    # Unsharded on one device: 18 bytes a parameter (2 + 4 + 12) is already 121 GB.
    job = parse_args("--model-preset llama2-7b --bf16 --seq-length 4096 "
                     "--device-memory-gb 80".split())  # fmt: skip
    result = plan(job, 1)
    assert (
        result.ranks[0].weight_bytes + result.ranks[0].grad_bytes + result.ranks[0].optimizer_bytes
        == 18 * 6_738_415_616
    )
    assert result.fits is False
    assert "does NOT fit in 80 GB" in format_plan(job, 1)
    # The distributed optimizer divides only the 12 bytes of state by DP.
    sharded = parse_args(SEVEN_B + ["--tensor-model-parallel-size", "1"])
    unsharded = parse_args([a for a in SEVEN_B if a != "--use-distributed-optimizer"]
                           + ["--tensor-model-parallel-size", "1"])  # fmt: skip
    a, b = plan(sharded, 8).ranks[0], plan(unsharded, 8).ranks[0]
    assert b.optimizer_bytes == 8 * a.optimizer_bytes and a.weight_bytes == b.weight_bytes
    assert plan(sharded, 8).fits is None  # no device memory given


def test_layer_parameters_tp_shares():
    model = ModelConfig.from_preset("llama2-70b")  # 64 heads, 8 K/V heads
    h, f = 8192, 28672
    assert layer_parameters(model, 8) == (2 * h * h + 2 * 1024 * h) // 8 + 3 * h * f // 8 + 2 * h
    # 16 ranks > 8 K/V heads: every rank holds all K/V rows.
    assert layer_parameters(model, 16) == 2 * h * h // 16 + 2 * 1024 * h + 3 * h * f // 16 + 2 * h


def test_plan_tool_prints_and_rejects_bad_layouts(capsys):
    assert plan_main(["--world-size", "32", *SEVEN_B]) == 0
    assert "TP 8 x PP 1 x DP 4" in capsys.readouterr().out
    assert plan_main(["--world-size", "12", *SEVEN_B]) == 2
    assert "world size (12) must be divisible" in capsys.readouterr().err


# Context parallelism ---------------------------------------------------------------------

LONG_7B = (
    "--model-preset llama2-7b --max-position-embeddings 131072 --seq-length 32768 "
    "--tensor-model-parallel-size 8 --sequence-parallel --bf16 --use-distributed-optimizer "
    "--micro-batch-size 1 --global-batch-size 64 --recompute-granularity selective --train-iters 1"
).split()


def test_context_parallel_plan_splits_activations_and_shards_over_dp_x_cp():
    """LLaMA-2-7B at 32k tokens, TP=8 on 16 ranks: CP2 x DP1 against DP2 on half as many
    tokens per rank; the optimizer state is sharded over DP x CP either way."""
    split = plan(parse_args(LONG_7B + ["--context-parallel-size", "2"], world_size=16), 16)
    whole = plan(parse_args(LONG_7B, world_size=16), 16)
    assert split.data_parallel_size == 1 and split.num_microbatches == 64
    assert split.activation_bytes_per_layer * 2 == whole.activation_bytes_per_layer
    assert split.ranks[0].optimizer_bytes == whole.ranks[0].optimizer_bytes  # 2 shards each
    # The whole sequence is counted once: the same FLOPs per iteration.
    assert split.flops_per_iteration == whole.flops_per_iteration
    text = format_plan(parse_args(LONG_7B + ["--context-parallel-size", "2"], world_size=16), 16)
    assert "world 16 = TP 8 x CP 2 (p2p) x PP 1 x DP 1" in text
    assert "seq 32768 (16384 tokens per CP rank)" in text


def test_context_parallel_traffic_per_layer():
    s, cp, kv_width = 32768, 4, 4 * 128  # 32 K/V heads over TP=8, head dim 128
    tokens = s // cp
    job = parse_args(LONG_7B + ["--context-parallel-size", "4"], world_size=32)
    block = 2 * tokens * kv_width  # K|V of one rank's chunks
    # Ring: forward, recomputed forward and backward pass K|V (bf16) 3 hops; dK|dV (float32)
    # travel 4 hops in the backward.
    assert context_parallel_bytes(job) == 3 * 3 * block * 2 + 4 * block * 4
    assert communication_bytes(job, 32)["context"] == context_parallel_bytes(job) * 32 * 64
    job.model.cp_comm_type = "a2a"
    q_width = 32 // 8 * 128
    # All-to-all: Q, K, V, output move 3/4 of themselves, in forward, recompute and backward.
    values = 2 * tokens * q_width + 2 * tokens * kv_width
    assert context_parallel_bytes(job) == 3 * 3 * values * 2 // 4
    job.parallel.context_parallel_size = 1
    assert context_parallel_bytes(job) == 0


def test_a_chunked_head_keeps_no_softmax():
    """LLaMA-3-8B at TP=1, 8k tokens: the whole logits' float32 softmax over 128,256 ids
    (4.2 GB) gives way, by default, to a float32 log-sum-exp and the input's gradient per
    token and the weight's float32 gradient; at TP=8 with a 32,000-id vocabulary (a slice
    of 4,096, the hidden size) the default is the whole logits."""
    from engine.planning.cost_model import output_activation_bytes

    model = ModelConfig.from_preset("llama3-8b", cross_entropy_chunk_size=0)
    s, h, v = 8192, 4096, 128256
    inputs = 2 * s * h * 2
    whole = inputs + 4 * s * v
    assert output_activation_bytes(model, s, 1, 1) == whole
    model.cross_entropy_chunk_size = None
    chunked = inputs + s * (4 + 2 * h) + v * h * 4
    assert output_activation_bytes(model, s, 1, 1) == chunked
    assert whole / chunked > 1.8  # the weight gradient (2.1 GB) is the most of it
    model.cross_entropy_chunk_size = 1024
    assert output_activation_bytes(model, s, 1, 1) == chunked
    narrow = ModelConfig.from_preset("llama2-7b")
    assert output_activation_bytes(narrow, 4096, 1, 8) == 2 * 4096 * h * 2 + 4 * 4096 * 4096


def test_fsdp2_plan_counts_the_gathered_layers_and_the_all_gathers():
    """Tiny model, FSDP2 on 4 ranks, float32: two layers and the root (embedding, final
    norm, head) unsharded at the peak, plus every float32 gradient when a step accumulates
    two microbatches unsharded; all-gathers forward and backward per microbatch."""
    argv = ["--model-preset", "tiny", "--use-torch-fsdp2", "--seq-length", "16", "--train-iters",
            "1", "--micro-batch-size", "1"]  # fmt: skip
    layer = layer_parameters(ModelConfig.from_preset("tiny"), 1)
    one = plan(parse_args(argv, world_size=4), 4)
    total = one.ranks[0].parameters  # the padded vocabulary's rows included
    root = total - 2 * layer
    assert one.ranks[0].gathered_bytes == (2 * layer + root) * 4
    two = parse_args(argv + ["--global-batch-size", "8"], world_size=4)
    assert plan(two, 4).ranks[0].gathered_bytes == (2 * layer + root) * 4 + total * 4
    assert communication_bytes(two, 4)["data"] == 3 * total * (2 * 2 * 4 + 4) // 4
    two.ddp.fsdp_reduce_every_microbatch = True
    assert plan(two, 4).ranks[0].gathered_bytes == (2 * layer + root) * 4
    assert communication_bytes(two, 4)["data"] == 3 * total * (2 * 2 * 4 + 2 * 4) // 4
    assert "FSDP2: weights (float32, the main parameters)" in format_plan(two, 4)
