"""Layer assignment over pipeline stages and virtual chunks (pure arithmetic, no ranks)."""

from __future__ import annotations

import pytest

from engine.pipeline_parallel.layout import layers_per_rank, virtual_stage_layers


def test_even_split():
    assert virtual_stage_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert virtual_stage_layers(32, 1) == [list(range(32))]


def test_virtual_chunks_interleave_ranks():
    # Virtual stage k·p + r is chunk k of rank r: rank 0 holds layers 0 and 4, rank 1 holds
    # 1 and 5, and so on.
    stages = virtual_stage_layers(8, 4, 2)
    assert stages == [[0], [1], [2], [3], [4], [5], [6], [7]]
    rank0 = [stages[k * 4 + 0] for k in range(2)]
    assert rank0 == [[0], [4]]
    assert virtual_stage_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_explicit_first_and_last_stage_counts():
    assert layers_per_rank(8, 4, 1, 3) == [1, 2, 2, 3]
    assert layers_per_rank(7, 4, 1, None) == [1, 2, 2, 2]
    assert layers_per_rank(7, 4, None, 4) == [1, 1, 1, 4]
    assert layers_per_rank(5, 2, 2, 3) == [2, 3]
    assert virtual_stage_layers(8, 4, None, 1, 3) == [[0], [1, 2], [3, 4], [5, 6, 7]]
    # With chunks, each rank's count is split over its chunks.
    assert virtual_stage_layers(12, 4, 2, 4, 4) == [
        [0, 1], [2], [3], [4, 5], [6, 7], [8], [9], [10, 11]
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        ((6, 4), r"--num-layers \(6\) is not divisible by --pipeline-model-parallel-size \(4\)"),
        ((8, 4, 4), r"--num-layers \(8\) must be divisible by .*\(4\) x virtual .*\(4\)"),
        ((8, 4, None, 4, 3), r"1 of --num-layers \(8\) remain for 2 other pipeline ranks"),
        ((8, 2, None, 3, 4), r"\(3\) \+ --decoder-last-pipeline-num-layers \(4\) must equal"),
        ((8, 1, None, 4), r"need --pipeline-model-parallel-size >= 2"),
        ((8, 4, None, 0), r"--decoder-first-pipeline-num-layers must be >= 1, got 0"),
        ((12, 4, 2, 3, 3), r"rank 0 would hold 3 layers.*--decoder-first/last-pipeline"),
    ],
)
def test_errors_name_the_values_and_flags(args, message):
    with pytest.raises(ValueError, match=message):
        virtual_stage_layers(*args)
