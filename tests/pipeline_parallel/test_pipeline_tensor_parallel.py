"""Pipeline x tensor parallelism with sequence parallelism on 8 gloo ranks: PP=4 x TP=2 (1F1B
and interleaved) against the single-process run, as in `test_pipeline_schedules`."""

from __future__ import annotations

from engine.models import ModelConfig
from tests.pipeline_parallel.test_schedules import (
    check_1f1b_bound,
    check_interleaved_bound,
    check_parity,
    pipeline_run,
)
from tests.rank_pool import module_pool

pool = module_pool(8)


def test_1f1b_pp4_tp2_sequence_parallel(pool):
    config = ModelConfig.from_preset("tiny-gqa", num_layers=4, sequence_parallel=True)
    per_rank = pool.run(pipeline_run, config, 2, 4, None, [1, 4, 9])
    check_parity(per_rank, 4, "tp=2 sp pp=4")
    check_1f1b_bound(per_rank, 4)


def test_interleaved_pp4_v2_tp2_sequence_parallel(pool):
    config = ModelConfig.from_preset(
        "tiny", num_layers=8, sequence_parallel=True, tie_word_embeddings=True
    )
    per_rank = pool.run(pipeline_run, config, 2, 4, 2, [4, 8])
    check_parity(per_rank, 4, "tied tp=2 sp pp=4 v=2")
    check_interleaved_bound(per_rank, 4, 2)
