"""Which decoder layers each pipeline stage (and each virtual chunk) builds: arithmetic on
plain integers, no process group needed.

Layers are numbered globally ``0 .. num_layers-1``. With ``p`` pipeline ranks and ``v``
virtual chunks per rank there are ``p·v`` virtual stages; virtual stage ``k·p + r`` is chunk
``k`` of rank ``r``, so a microbatch visits rank 0, 1, ..., p-1, then rank 0 again (its chunk
1), and so on (Megatron's interleaved order). The layers are laid out over the virtual stages
in that order.

Without an explicit split every virtual stage gets ``num_layers / (p·v)`` layers. Megatron's
``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers`` give the
first and/or last *rank* its own count (the embedding or the output head make those stages
heavier); the other ranks share the rest evenly, and each rank's layers are split evenly over
its ``v`` chunks.
"""

from __future__ import annotations


def layers_per_rank(
    num_layers: int,
    pipeline_model_parallel_size: int,
    decoder_first_pipeline_num_layers: int | None = None,
    decoder_last_pipeline_num_layers: int | None = None,
) -> list[int]:
    """How many layers each pipeline rank holds in total (over all its virtual chunks).

    Raises ValueError naming the counts and the flag to change when they do not add up.
    """
    p = pipeline_model_parallel_size
    first, last = decoder_first_pipeline_num_layers, decoder_last_pipeline_num_layers
    if p < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be at least 1, got {p}")
    if first is None and last is None:
        if num_layers % p != 0:
            raise ValueError(
                f"--num-layers ({num_layers}) is not divisible by --pipeline-model-parallel-size "
                f"({p}); set --decoder-first-pipeline-num-layers and/or "
                "--decoder-last-pipeline-num-layers for an uneven split"
            )
        return [num_layers // p] * p
    if p == 1:
        raise ValueError(
            "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers need "
            "--pipeline-model-parallel-size >= 2"
        )
    for flag, count in (("first", first), ("last", last)):
        if count is not None and count < 1:
            raise ValueError(f"--decoder-{flag}-pipeline-num-layers must be >= 1, got {count}")
    fixed = (first or 0) + (last or 0)
    middle_ranks = p - (first is not None) - (last is not None)
    rest = num_layers - fixed
    if middle_ranks == 0:
        if rest != 0:
            raise ValueError(
                f"--decoder-first-pipeline-num-layers ({first}) + "
                f"--decoder-last-pipeline-num-layers ({last}) must equal --num-layers "
                f"({num_layers}) with --pipeline-model-parallel-size {p}"
            )
        middle = 0
    else:
        if rest < middle_ranks or rest % middle_ranks != 0:
            raise ValueError(
                f"after --decoder-first-pipeline-num-layers ({first}) and "
                f"--decoder-last-pipeline-num-layers ({last}), {rest} of --num-layers "
                f"({num_layers}) remain for {middle_ranks} other pipeline ranks: they must "
                "divide evenly, at least one layer each"
            )
        middle = rest // middle_ranks
    counts = [middle] * p
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def virtual_stage_layers(
    num_layers: int,
    pipeline_model_parallel_size: int,
    virtual_pipeline_model_parallel_size: int | None = None,
    decoder_first_pipeline_num_layers: int | None = None,
    decoder_last_pipeline_num_layers: int | None = None,
) -> list[list[int]]:
    """Global layer numbers of every virtual stage, indexed by ``chunk·p + rank``.

    Example: 8 layers, p = 2, v = 2 -> ``[[0, 1], [2, 3], [4, 5], [6, 7]]``: rank 0 holds
    layers 0-1 (chunk 0) and 4-5 (chunk 1), rank 1 holds 2-3 and 6-7.
    """
    p, v = pipeline_model_parallel_size, virtual_pipeline_model_parallel_size or 1
    if v < 1:
        raise ValueError(f"virtual pipeline size must be at least 1, got {v}")
    per_rank = layers_per_rank(
        num_layers, p, decoder_first_pipeline_num_layers, decoder_last_pipeline_num_layers
    )
    for rank, count in enumerate(per_rank):
        if count % v != 0 or count < v:
            if decoder_first_pipeline_num_layers or decoder_last_pipeline_num_layers:
                fix = "change --decoder-first/last-pipeline-num-layers"
            else:
                fix = (
                    f"--num-layers ({num_layers}) must be divisible by "
                    f"--pipeline-model-parallel-size ({p}) x virtual pipeline size ({v})"
                )
            raise ValueError(
                f"pipeline rank {rank} would hold {count} layers, not a positive multiple of "
                f"the virtual pipeline size ({v}): {fix}"
            )
    stages, start = [], 0
    for _chunk in range(v):
        for rank in range(p):
            size = per_rank[rank] // v
            stages.append(list(range(start, start + size)))
            start += size
    return stages
