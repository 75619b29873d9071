"""Process groups (Megatron's rank order) and the 7B-class models on the meta device, on 8 real
gloo ranks: parameter counts, per-rank shares at TP=8, per-stage shapes at TP=8 x PP=4."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine import parallel_state
from engine.models import ModelConfig, family_of
from tests.rank_pool import module_pool

pool = module_pool(8)


def test_rank_layout_follows_megatron_order():
    layout = parallel_state.rank_layout(8, 2, 2)
    assert layout["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["data"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["pipeline"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["model"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ValueError, match=r"world size 8 is not divisible by .* = 6"):
        parallel_state.rank_layout(8, 3, 2)


def describe_ranks(tp: int, pp: int, vpp: int | None) -> dict[str, object]:
    parallel_state.initialize_model_parallel(tp, pp, vpp)
    try:
        ps = parallel_state
        probe = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(probe, group=ps.get_tensor_model_parallel_group())
        return {
            "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
            "pp": (
                ps.get_pipeline_model_parallel_rank(),
                ps.get_pipeline_model_parallel_world_size(),
            ),
            "tp_group_sum": probe.item(),
            "next": ps.get_pipeline_model_parallel_next_rank(),
            "prev": ps.get_pipeline_model_parallel_prev_rank(),
            "first": ps.is_pipeline_first_stage(),
            "last": ps.is_pipeline_last_stage(),
            "last_ignoring_virtual": ps.is_pipeline_last_stage(ignore_virtual=True),
            "embedding": ps.get_embedding_global_ranks(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        }
    finally:
        parallel_state.destroy_model_parallel()


def test_groups_and_getters_on_real_ranks(pool):
    ranks = pool.run(describe_ranks, 2, 2, None)
    for g, info in enumerate(ranks):
        assert info["tp"] == (g % 2, 2)
        assert info["dp"] == ((g // 2) % 2, 2)
        assert info["pp"] == (g // 4, 2)
        assert info["tp_group_sum"] == (g - g % 2) * 2 + 1  # the two adjacent ranks
        assert (info["next"], info["prev"]) == ((g + 4) % 8, (g + 4) % 8)
        assert info["first"] == (g < 4) and info["last"] == (g >= 4)
        assert info["embedding"] == [g % 4, g % 4 + 4]
    # Interleaving: only the last model chunk is the last stage.
    ranks = pool.run(describe_ranks, 1, 4, 2)
    assert [info["pp"][0] for info in ranks] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(info["vpp"] == 2 for info in ranks)
    assert not any(info["last"] for info in ranks)  # chunk 0 is selected
    assert [info["last_ignoring_virtual"] for info in ranks] == [False] * 6 + [True] * 2


# Published sizes of the checkpoints (their model cards / safetensors index totals).
PUBLISHED_PARAMETERS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,  # tied: the head is the embedding
    "llama3.2-3b": 3_212_749_824,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
}


def count_on_meta(preset: str, tp: int, stages: int = 1) -> list[dict[str, object]]:
    """Build every pipeline stage of ``preset`` at TP=tp on the meta device; count and shape."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        config = ModelConfig.from_preset(preset)
        per_stage = config.num_layers // stages
        out = []
        for stage in range(stages):
            with torch.device("meta"):
                model = family_of(config).model(
                    config,
                    pre_process=stage == 0,
                    post_process=stage == stages - 1,
                    layer_numbers=list(range(stage * per_stage, (stage + 1) * per_stage)),
                )
            out.append(
                {
                    "count": sum(p.numel() for p in model.parameters()),
                    "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
                    "padded_vocab": getattr(model, "padded_vocab_size", None),
                }
            )
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMETERS))
def test_presets_have_the_published_parameter_counts(pool, preset):
    (stage,) = pool.run(count_on_meta, preset, 1)[0]
    config = ModelConfig.from_preset(preset)
    assert stage["count"] == PUBLISHED_PARAMETERS[preset] == config.num_parameters()


def test_llama2_7b_share_of_each_rank_at_tp8(pool):
    results = pool.run(count_on_meta, "llama2-7b", 8)
    h, ffn, layers = 4096, 11008, 32
    padded_vocab = 32768  # 32000 padded to a multiple of 128 x 8
    expected = (
        2 * padded_vocab // 8 * h  # embedding and output head, vocab-sharded
        + layers * (4 * h * h // 8 + 3 * h * ffn // 8 + 2 * h)  # norms are replicated
        + h  # final norm
    )
    assert expected == 843_321_344
    assert [stage["count"] for (stage,) in results] == [expected] * 8


def share_of_a_rank(preset: str, tp: int) -> int:
    """Parameters of one TP rank of the whole model, counted by hand: vocabulary rows and
    projections sharded, K|V sharded when there are at least ``tp`` K/V heads (else whole on
    every rank), norms replicated."""
    c = ModelConfig.from_preset(preset)
    h, d, ffn = c.hidden_size, c.head_dim, c.ffn_hidden_size
    q, kv = c.num_attention_heads * d, c.kv_heads * d
    padded = -(-c.vocab_size // (128 * tp)) * 128 * tp
    kv_rows = 2 * kv // tp if c.kv_heads >= tp else 2 * kv
    layer = (q // tp + kv_rows) * h + h * q // tp + 3 * h * ffn // tp + 2 * h
    layer += (q // tp + kv_rows) if c.qkv_bias else 0
    layer += 2 * d if c.qk_layernorm else 0
    heads = 1 if c.tie_word_embeddings else 2
    return heads * padded // tp * h + c.num_layers * layer + h


@pytest.mark.parametrize(
    "preset, tp",
    [("llama3.1-8b", 8), ("llama3.2-1b", 8), ("llama3.2-3b", 8), ("mistral-7b-v0.3", 8),
     ("qwen3-8b", 8), ("qwen2.5-7b", 4)],  # 28 query heads: TP=8 does not divide them
)  # fmt: skip
def test_share_of_each_rank(pool, preset, tp):
    results = pool.run(count_on_meta, preset, tp)
    counts = [stage["count"] for (stage,) in results]
    assert counts == [share_of_a_rank(preset, tp)] * 8


def test_llama2_7b_stage_shapes_at_tp8_pp4(pool):
    stages = pool.run(count_on_meta, "llama2-7b", 8, 4)[0]
    first, middle, _, last = stages
    assert first["shapes"]["embedding.weight"] == (4096, 4096)
    assert "output_layer.weight" not in first["shapes"]
    assert (
        "embedding.weight" not in middle["shapes"] and "final_norm.weight" not in middle["shapes"]
    )
    assert last["shapes"]["output_layer.weight"] == (4096, 4096)
    assert last["padded_vocab"] == 32768
    for stage in stages:
        layers = {n.split(".")[1] for n in stage["shapes"] if n.startswith("layers.")}
        assert len(layers) == 8
        assert stage["shapes"]["layers.0.attention.qkv.weight"] == (3 * 4096 // 8, 4096)
        assert stage["shapes"]["layers.0.attention.out.weight"] == (4096, 4096 // 8)
        assert stage["shapes"]["layers.0.mlp.gate_up.weight"] == (2 * 11008 // 8, 4096)
        assert stage["shapes"]["layers.0.mlp.down.weight"] == (4096, 11008 // 8)
        assert stage["shapes"]["layers.0.input_norm.weight"] == (4096,)
    assert sum(stage["count"] for stage in stages) == 843_321_344
