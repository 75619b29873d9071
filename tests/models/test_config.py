"""Configuration is validated before any process group starts; each error names the values."""

from __future__ import annotations

import pytest

from engine.models.config import ModelConfig
from engine.parallel_state import ParallelConfig


def _check(model_overrides=None, tp=1, pp=1, vpp=None, world_size=None, seq_length=None):
    model = ModelConfig.from_preset("tiny", **(model_overrides or {}))
    model.validate(ParallelConfig(tp, pp, vpp), world_size=world_size, seq_length=seq_length)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(tp=3),
            r"--num-attention-heads \(4\) must be divisible by --tensor-model-parallel-size \(3\)",
        ),
        (
            dict(model_overrides=dict(hidden_size=66)),
            r"--hidden-size \(66\) must be divisible by --num-attention-heads \(4\)",
        ),
        (
            dict(model_overrides=dict(num_attention_heads=8, num_query_groups=3, hidden_size=64)),
            r"--num-attention-heads \(8\) must be divisible by --num-query-groups \(3\)",
        ),
        (
            dict(
                model_overrides=dict(num_attention_heads=12, num_query_groups=6, hidden_size=96),
                tp=4,
            ),
            r"--num-query-groups \(6\) and --tensor-model-parallel-size \(4\) are incompatible",
        ),
        (
            dict(pp=4, vpp=2),
            r"--num-layers \(2\) is not divisible by --pipeline-model-parallel-size \(4\); set "
            r"--decoder-first-pipeline-num-layers",
        ),
        (
            dict(model_overrides=dict(num_layers=4), pp=2, vpp=4),
            r"pipeline rank 0 would hold 2 layers, not a positive multiple of the virtual "
            r"pipeline size \(4\)",
        ),
        (
            dict(model_overrides=dict(num_layers=7, decoder_first_pipeline_num_layers=2), pp=4),
            r"after --decoder-first-pipeline-num-layers \(2\) .* 5 of --num-layers \(7\) remain "
            r"for 3 other pipeline ranks",
        ),
        (
            dict(tp=2, pp=2, world_size=6),
            r"world size \(6\) must be divisible by --tensor-model-parallel-size \(2\) x "
            r"--pipeline-model-parallel-size \(2\) = 4",
        ),
        (
            dict(model_overrides=dict(sequence_parallel=True), tp=4, seq_length=30),
            r"--seq-length \(30\) must be divisible by --tensor-model-parallel-size \(4\) with "
            r"--sequence-parallel",
        ),
        (
            dict(model_overrides=dict(ffn_hidden_size=174), tp=4),
            r"--ffn-hidden-size \(174\) must be divisible by --tensor-model-parallel-size \(4\)",
        ),
        (
            dict(seq_length=512),
            r"--seq-length \(512\) exceeds --max-position-embeddings \(256\)",
        ),
        (
            dict(model_overrides=dict(recompute_granularity="some")),
            r"--recompute-granularity must be 'full' or 'selective', got 'some'",
        ),
        (
            dict(model_overrides=dict(attention_backend="cuda")),
            r"--attention-backend must be 'auto', 'torch' or 'triton', got 'cuda'",
        ),
        (dict(tp=0), r"parallel sizes must be at least 1"),
    ],
)
def test_each_invalid_layout_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _check(**kwargs)


def test_valid_layouts_pass():
    _check(tp=4, pp=2, world_size=16, seq_length=256)
    _check(model_overrides=dict(sequence_parallel=True), tp=2, seq_length=32)
    # Fewer K/V heads than TP ranks: replicated, allowed.
    ModelConfig.from_preset("tiny-gqa").validate(ParallelConfig(tensor_model_parallel_size=4))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model preset 'llama9'.*'llama2-7b'"):
        ModelConfig.from_preset("llama9")
