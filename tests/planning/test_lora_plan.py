"""The plan under LoRA: adapter parameters per rank against `apply_lora` on the meta-device
model on real ranks, the 7B/8B figures by hand, memory rows (frozen base, adapter-only
gradients and optimizer state), communication, and the printed plan."""

from __future__ import annotations

import pytest
import torch

from engine import parallel_state
from engine.models import LlamaModel
from engine.models.config import ModelConfig
from engine.peft import LoraConfig, apply_lora
from engine.planning.cost_model import communication_bytes, plan, stage_layers
from engine.planning.lora import (
    lora_activation_bytes_per_layer,
    lora_parameters,
    lora_parameters_per_rank,
    targeted_modules,
)
from engine.training.arguments import parse_args
from tests.rank_pool import module_pool
from tools.plan import main as plan_main

pool = module_pool(4)

HF_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVERY_MODULE = LoraConfig(rank=16, target_modules=HF_MODULES)


def job_args(preset: str, tp: int, *extra: str) -> list[str]:
    return [
        "--model-preset", preset, "--tensor-model-parallel-size", str(tp), "--bf16",
        "--use-distributed-optimizer", "--micro-batch-size", "1", "--global-batch-size", "64",
        "--seq-length", "4096", *extra,
    ]  # fmt: skip


def count_adapters_on_meta(preset: str, tp: int, pp: int, lora: LoraConfig) -> tuple[int, int]:
    """(pipeline rank, adapter parameters `apply_lora` gives this rank's meta-device stage)."""
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        with torch.device("meta"):
            model = LlamaModel(ModelConfig.from_preset(preset))
        adapters = apply_lora(model, lora)
        assert all(
            not p.requires_grad for p in model.parameters() if all(p is not a for a in adapters)
        )
        return parallel_state.get_pipeline_model_parallel_rank(), sum(a.numel() for a in adapters)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize(
    "preset, tp, pp, lora",
    [
        ("llama2-7b", 1, 1, EVERY_MODULE),
        ("llama2-7b", 2, 1, EVERY_MODULE),
        ("llama3.1-8b", 1, 1, EVERY_MODULE),
        ("llama3.1-8b", 2, 1, EVERY_MODULE),
        ("llama3.1-8b", 2, 2, LoraConfig(rank=8, target_modules=("qkv", "down"))),
        ("tiny-gqa", 4, 1, EVERY_MODULE),  # 2 K/V heads over 4 ranks: K/V adapters replicated
        ("tiny-gqa", 4, 1, LoraConfig(rank=4, target_modules=("k_proj", "up_proj"))),
    ],
)
def test_adapters_per_rank_equal_apply_lora(pool, preset, tp, pp, lora):
    model = ModelConfig.from_preset(preset)
    layers = stage_layers(model, pp)
    for stage, count in pool.run(count_adapters_on_meta, preset, tp, pp, lora):
        assert count == lora_parameters_per_rank(model, lora, tp, layers[stage]), (stage, count)


def test_7b_and_8b_adapters_by_hand():
    r, h = 16, 4096
    seven, eight = ModelConfig.from_preset("llama2-7b"), ModelConfig.from_preset("llama3.1-8b")
    # q, k, v, o: A [r, 4096] and B [4096, r]; gate, up, down: 4096 + 11008 per adapter.
    assert lora_parameters(seven, EVERY_MODULE) == r * ((h + h) * 4 + (h + 11008) * 3) * 32
    assert lora_parameters(seven, EVERY_MODULE) == 39_976_960
    # 8 K/V heads of 128: k and v are [1024, 4096]; f = 14336.
    kv, f = 1024, 14336
    assert lora_parameters(eight, EVERY_MODULE) == r * (
        2 * (h + h) + 2 * (h + kv) + 3 * (h + f)
    ) * 32 == 41_943_040  # fmt: skip
    # TP=2: B of column-parallel q, k, v, gate, up and A of row-parallel o, down are halved.
    assert lora_parameters_per_rank(seven, EVERY_MODULE, 2, 32) == r * (
        4 * (h + h // 2) + 2 * (h + 11008 // 2) + (11008 // 2 + h)
    ) * 32 == 27_328_512  # fmt: skip
    assert targeted_modules(EVERY_MODULE) == "q,k,v,o,gate,up,down"
    assert targeted_modules(LoraConfig(target_modules=("down", "qkv"))) == "q,k,v,down"


@pytest.mark.parametrize("preset, tp", [("llama2-7b", 1), ("llama2-7b", 2),
                                        ("llama3.1-8b", 1), ("llama3.1-8b", 2)])  # fmt: skip
def test_memory_rows_train_only_the_adapters(preset, tp):
    world = 8
    lora = plan(parse_args(job_args(preset, tp, "--lora-rank", "16")), world)
    full = plan(parse_args(job_args(preset, tp)), world)
    (rank,), (full_rank,) = lora.ranks, full.ranks
    dp = world // tp
    adapters = lora_parameters_per_rank(ModelConfig.from_preset(preset), EVERY_MODULE, tp, 32)
    assert rank.adapter_parameters == adapters and rank.parameters == full_rank.parameters
    assert rank.weight_bytes == 2 * (rank.parameters + adapters)  # bf16 base + adapters
    assert rank.grad_bytes == 4 * adapters  # float32 DDP buffer of the adapters only
    assert rank.optimizer_bytes == 12 * -(-adapters // dp)  # main copy + 2 moments, over DP
    assert rank.weight_bytes / full_rank.weight_bytes < 1.01  # weights ~ the base
    assert rank.optimizer_bytes / full_rank.optimizer_bytes < 0.01  # << full fine-tuning
    assert rank.grad_bytes / full_rank.grad_bytes < 0.01
    # One r-wide u per adapter per token, nothing else without dropout.
    extra = rank.activation_bytes - full_rank.activation_bytes
    assert extra == 32 * 2 * 4096 * 16 * 7
    # ZeRO-1 over DP: reduce-scatter of the adapters' grads + all-gather of their bf16 values.
    assert communication_bytes(parse_args(job_args(preset, tp, "--lora-rank", "16")), world)[
        "data"
    ] == (dp - 1) * adapters * (4 + 2) // dp  # fmt: skip


def test_float32_optimizer_and_pipeline_stages():
    args = "--model-preset llama2-7b --lora-rank 8 --pipeline-model-parallel-size 2 "
    args += "--micro-batch-size 1 --global-batch-size 8 --seq-length 2048"
    result = plan(parse_args(args.split()), 2)
    lora = LoraConfig(rank=8)  # the engine's default targets: every projection
    for rank in result.ranks:
        adapters = lora_parameters_per_rank(ModelConfig.from_preset("llama2-7b"), lora, 1, 16)
        assert rank.adapter_parameters == adapters
        # float32 model: no separate main copy, Adam's moments only; no distributed optimizer.
        assert rank.optimizer_bytes == 8 * adapters and rank.grad_bytes == 4 * adapters
        assert rank.weight_bytes == 4 * (rank.parameters + adapters)


def test_adapter_activations():
    model = ModelConfig.from_preset("llama2-7b", sequence_parallel=True)
    s, b, r, t, h, f = 4096, 1, 16, 2, 4096, 11008
    lora = LoraConfig(rank=r, target_modules=HF_MODULES)
    # u of q, k, v, gate, up over the whole (gathered) sequence, of o, down over the shard.
    assert lora_activation_bytes_per_layer(model, lora, s, b, t) == 2 * r * (5 * s + 2 * s // t)
    # Dropout: each adapter's dropped input (2 bytes) and mask (1 byte): the sequence shard of h
    # on q, k, v, gate, up; the whole sequence of the row-parallel inputs on o and down.
    dropped = LoraConfig(rank=r, dropout=0.1, target_modules=HF_MODULES)
    inputs = 5 * s // t * h + s * h // t + s * f // t
    assert lora_activation_bytes_per_layer(model, dropped, s, b, t) == (
        2 * r * (5 * s + 2 * s // t) + 3 * inputs
    )
    # Full recompute: the adapters' activations come back with the one recomputed layer only.
    job = parse_args(job_args("llama2-7b", 1, "--recompute-granularity", "full"))
    with_lora = parse_args(job_args("llama2-7b", 1, "--recompute-granularity", "full",
                                    "--lora-rank", "16"))  # fmt: skip
    extra = plan(with_lora, 8).ranks[0].activation_bytes - plan(job, 8).ranks[0].activation_bytes
    assert extra == 2 * s * 16 * 7


@pytest.mark.parametrize(
    "preset, figure, share",
    [("llama2-7b", "39,976,960", "0.59%"), ("llama3.1-8b", "41,943,040", "0.52%")],
)
@pytest.mark.parametrize("tp", [1, 2])
def test_printed_plan(capsys, preset, figure, share, tp):
    assert plan_main(["--world-size", "8", *job_args(preset, tp, "--lora-rank", "16")]) == 0
    text = capsys.readouterr().out
    assert f"LoRA r=16 on q,k,v,o,gate,up,down: {figure} adapter parameters ({share} of" in text
    assert "adapters |" in text
    with pytest.raises(SystemExit):  # a usage error naming the flag, as the trainer's
        plan_main(["--world-size", "8", *job_args(preset, tp, "--lora-alpha", "8")])
    assert "--lora-alpha need --lora-rank" in capsys.readouterr().err
