"""Process groups for tensor (TP), context (CP), data (DP) and pipeline (PP) parallelism.

Rank order follows Megatron-LM's default: TP ranks are adjacent (fastest varying), then CP,
then DP, then PP. With world size W = TP x CP x DP x PP, global rank ``g`` has

    tp_rank = g % TP,   cp_rank = (g // TP) % CP,   dp_rank = (g // (TP x CP)) % DP,
    pp_rank = g // (TP x CP x DP).

TP ranks are adjacent because TP all-reduces run inside every layer and want the fastest
links (one node's NVLink); CP passes K/V blocks around a ring in every attention, so it comes
next; PP sends point to point once per microbatch, so it can span nodes.

Context parallelism splits each sequence, not the model: CP ranks hold the same weights and
see different tokens of the same samples, so gradients are reduced over DP x CP together
(``get_data_parallel_group(with_context_parallel=True)``), while the data loader shards
samples over DP alone.

Every group is created by every rank, in the same order (``new_group`` is collective).
All state lives in one `_ParallelState` object; the getters read it.
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass
class ParallelConfig:
    """How a job is split (``--tensor-model-parallel-size`` etc.); DP is what the world size
    leaves over."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    """Ranks each sequence is split over (``--context-parallel-size``)."""

    def invalid_sizes(self) -> bool:
        """A size below 1 (nothing else about the layout can then be computed)."""
        vpp = self.virtual_pipeline_model_parallel_size or 1
        sizes = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size, vpp,
                 self.context_parallel_size)  # fmt: skip
        return min(sizes) < 1

    @property
    def replica_size(self) -> int:
        """TP x CP x PP: the ranks one data-parallel replica spans."""
        return (
            self.tensor_model_parallel_size
            * self.context_parallel_size
            * self.pipeline_model_parallel_size
        )

    def errors(self, world_size: int | None = None) -> list[str]:
        """What is wrong with the sizes themselves, or with them on ``world_size`` ranks."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        cp = self.context_parallel_size
        if self.invalid_sizes():
            return [
                f"parallel sizes must be at least 1: --tensor-model-parallel-size {tp}, "
                f"--pipeline-model-parallel-size {pp}, --context-parallel-size {cp}, virtual "
                f"pipeline size {self.virtual_pipeline_model_parallel_size or 1}"
            ]
        if world_size is not None and world_size % self.replica_size != 0:
            product = _product_of_sizes(tp, pp, cp)
            return [f"world size ({world_size}) must be divisible by {product}"]
        return []


def _product_of_sizes(tp: int, pp: int, cp: int) -> str:
    """``--tensor-model-parallel-size (2) x ... = 8``, naming CP only when it is used."""
    parts = [f"--tensor-model-parallel-size ({tp})", f"--pipeline-model-parallel-size ({pp})"]
    if cp > 1:
        parts.insert(1, f"--context-parallel-size ({cp})")
    return " x ".join(parts) + f" = {tp * pp * cp}"


@dataclass
class _ParallelState:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    context_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    tensor_model_parallel_group: dist.ProcessGroup
    pipeline_model_parallel_group: dist.ProcessGroup
    data_parallel_group: dist.ProcessGroup
    context_parallel_group: dist.ProcessGroup
    data_context_parallel_group: dist.ProcessGroup
    context_global_ranks: list[int]
    model_parallel_group: dist.ProcessGroup
    embedding_group: dist.ProcessGroup | None
    pipeline_global_ranks: list[int]
    embedding_global_ranks: list[int]
    virtual_pipeline_model_parallel_rank: int | None = None


_STATE: _ParallelState | None = None


def rank_layout(
    world_size: int,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    context_parallel_size: int = 1,
) -> dict[str, list[list[int]]]:
    """The global ranks of every TP, CP, DP, DP x CP ("data_context"), PP and model-parallel
    (TP x PP) group.

    Pure arithmetic (no communication), so plans and tests can inspect a layout without
    starting it. Raises ValueError when the world size does not factor into TP x CP x DP x PP.
    """
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if min(tp, pp, cp) < 1:
        raise ValueError(
            f"--tensor-model-parallel-size ({tp}), --pipeline-model-parallel-size ({pp}) and "
            f"--context-parallel-size ({cp}) must be at least 1"
        )
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by {_product_of_sizes(tp, pp, cp)}"
        )
    dp = world_size // (tp * pp * cp)
    tps, cps, dps, pps = range(tp), range(cp), range(dp), range(pp)

    def rank(t: int, c: int, d: int, p: int) -> int:
        return t + c * tp + d * tp * cp + p * tp * cp * dp

    return {
        "tensor": [[rank(t, c, d, p) for t in tps] for p in pps for d in dps for c in cps],
        "context": [[rank(t, c, d, p) for c in cps] for p in pps for d in dps for t in tps],
        "data": [[rank(t, c, d, p) for d in dps] for p in pps for c in cps for t in tps],
        "data_context": [[rank(t, c, d, p) for d in dps for c in cps] for p in pps for t in tps],
        "pipeline": [[rank(t, c, d, p) for p in pps] for d in dps for c in cps for t in tps],
        "model": [[rank(t, c, d, p) for p in pps for t in tps] for d in dps for c in cps],
    }


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    timeout: timedelta | None = None,
    context_parallel_size: int = 1,
) -> None:
    """Build the TP, CP, PP, DP, DP x CP, model-parallel and embedding groups of the running
    job.

    The default process group must already be initialised (see `engine.device.init_distributed`).
    The embedding group holds the first and last pipeline stage of each pipeline, which both
    own a copy of a tied embedding. ``timeout`` bounds every wait in the new groups; give the
    default group's (``--distributed-timeout-minutes``): torch does not pass it on, and
    ``new_group`` would otherwise take the backend's default (30 minutes for gloo).
    """
    global _STATE
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call engine.device.init_distributed() first"
        )
    if _STATE is not None:
        raise RuntimeError("model parallel groups are already initialised; destroy them first")
    if virtual_pipeline_model_parallel_size is not None:
        if virtual_pipeline_model_parallel_size < 1:
            raise ValueError(
                "virtual pipeline model parallel size must be at least 1, got "
                f"{virtual_pipeline_model_parallel_size}"
            )
        if pipeline_model_parallel_size < 2 and virtual_pipeline_model_parallel_size > 1:
            raise ValueError(
                "interleaved pipelining (virtual pipeline size "
                f"{virtual_pipeline_model_parallel_size}) needs --pipeline-model-parallel-size "
                f">= 2, got {pipeline_model_parallel_size}"
            )

    world_size, me = dist.get_world_size(), dist.get_rank()
    layout = rank_layout(
        world_size, tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    )

    def my_group(rank_lists: list[list[int]]) -> tuple[dist.ProcessGroup | None, list[int]]:
        mine: tuple[dist.ProcessGroup | None, list[int]] = (None, [])
        for ranks in rank_lists:
            group = _group_for(ranks, timeout)
            if me in ranks:
                mine = (group, ranks)
        return mine

    tp_group, _ = my_group(layout["tensor"])
    cp_group, cp_ranks = my_group(layout["context"])
    dp_group, _ = my_group(layout["data"])
    dp_cp_group, _ = my_group(layout["data_context"])
    pp_group, pp_ranks = my_group(layout["pipeline"])
    mp_group, _ = my_group(layout["model"])
    # Each layout partitions the world: every rank is in one of its groups.
    assert tp_group is not None and dp_group is not None
    assert cp_group is not None and dp_cp_group is not None
    assert pp_group is not None and mp_group is not None
    # First and last stage of each pipeline (one rank when PP=1); None on middle stages.
    embedding_group, embedding_ranks = my_group(
        [sorted({ranks[0], ranks[-1]}) for ranks in layout["pipeline"]]
    )

    _STATE = _ParallelState(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        data_parallel_size=len(layout["data"][0]),
        context_parallel_size=context_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        tensor_model_parallel_group=tp_group,
        pipeline_model_parallel_group=pp_group,
        data_parallel_group=dp_group,
        context_parallel_group=cp_group,
        data_context_parallel_group=dp_cp_group,
        context_global_ranks=cp_ranks,
        model_parallel_group=mp_group,
        embedding_group=embedding_group,
        pipeline_global_ranks=pp_ranks,
        embedding_global_ranks=embedding_ranks,
        virtual_pipeline_model_parallel_rank=0 if virtual_pipeline_model_parallel_size else None,
    )


# Groups by rank list, for the life of the default process group. With PP=1 the pipeline,
# embedding and often the data groups are the same singletons, and the model group is the TP
# group; and re-initialising a layout (tests, tools) reuses its groups instead of building new
# gloo/NCCL communicators, as Megatron's destroy_model_parallel also leaves them alive. Every
# rank makes the same initialise calls in the same order, so the collective `new_group` calls
# still match on all ranks.
_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}
_GROUPS_WORLD: dist.ProcessGroup | None = None  # the default group the cached ones belong to


@atexit.register
def _release_groups() -> None:
    """Drop the cached groups while the interpreter is still whole. Left to its final
    teardown, a gloo group's destructor aborted the process now and then ("terminate called
    without an active exception", SIGABRT after `destroy_process_group` had returned: about 1
    run in 8 of a 2-rank job on 2 busy cores, none in 60 once released here)."""
    _GROUPS.clear()


def _group_for(ranks: list[int], timeout: timedelta | None = None) -> dist.ProcessGroup:
    global _GROUPS_WORLD
    if _GROUPS_WORLD is not dist.group.WORLD:
        _GROUPS.clear()
        _GROUPS_WORLD = dist.group.WORLD
    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(ranks, timeout=timeout)
    return _GROUPS[key]


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def destroy_model_parallel() -> None:
    """Forget the layout. The groups stay alive (and are reused by a later initialise with
    the same ranks) until the default process group is destroyed."""
    global _STATE
    _STATE = None


def _state() -> _ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "model parallel groups are not initialised: call "
            "engine.parallel_state.initialize_model_parallel() first"
        )
    return _STATE


# Tensor model parallel ------------------------------------------------------------------------


def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    return _state().tensor_model_parallel_group


def get_tensor_model_parallel_world_size() -> int:
    return _state().tensor_model_parallel_size


def get_tensor_model_parallel_rank() -> int:
    return dist.get_rank(get_tensor_model_parallel_group())


# Pipeline model parallel ----------------------------------------------------------------------


def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
    return _state().pipeline_model_parallel_group


def get_pipeline_model_parallel_world_size() -> int:
    return _state().pipeline_model_parallel_size


def get_pipeline_model_parallel_rank() -> int:
    return dist.get_rank(get_pipeline_model_parallel_group())


def get_pipeline_model_parallel_global_ranks() -> list[int]:
    """Global ranks of this rank's pipeline, stage 0 first."""
    return list(_state().pipeline_global_ranks)


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wrapping around, as interleaving needs)."""
    ranks = _state().pipeline_global_ranks
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous stage (wrapping around)."""
    ranks = _state().pipeline_global_ranks
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    return _state().virtual_pipeline_model_parallel_size


def get_virtual_pipeline_model_parallel_rank() -> int | None:
    return _state().virtual_pipeline_model_parallel_rank


def set_virtual_pipeline_model_parallel_rank(rank: int) -> None:
    """Select the model chunk the schedule is running (interleaved pipelining)."""
    _state().virtual_pipeline_model_parallel_rank = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on the stage that owns the input embedding (chunk 0 when interleaving)."""
    state = _state()
    if not ignore_virtual and state.virtual_pipeline_model_parallel_size is not None:
        if state.virtual_pipeline_model_parallel_rank != 0:
            return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the stage that owns the output head (the last chunk when interleaving)."""
    state = _state()
    if not ignore_virtual and state.virtual_pipeline_model_parallel_size is not None:
        last_chunk = state.virtual_pipeline_model_parallel_size - 1
        if state.virtual_pipeline_model_parallel_rank != last_chunk:
            return False
    return get_pipeline_model_parallel_rank() == state.pipeline_model_parallel_size - 1


# Context parallel -----------------------------------------------------------------------------


def get_context_parallel_group() -> dist.ProcessGroup:
    """The ranks that split each sequence of this rank's samples (same TP, DP and PP rank)."""
    return _state().context_parallel_group


def get_context_parallel_world_size() -> int:
    return _state().context_parallel_size


def get_context_parallel_rank() -> int:
    return dist.get_rank(get_context_parallel_group())


def get_context_parallel_global_ranks() -> list[int]:
    """Global ranks of this rank's CP group, CP rank 0 first (the ring's order)."""
    return list(_state().context_global_ranks)


# Data parallel --------------------------------------------------------------------------------


def get_data_parallel_group(with_context_parallel: bool = False) -> dist.ProcessGroup:
    """The replicas of this rank's weights over which samples are split (DP), or with
    ``with_context_parallel`` also the CP ranks that split them: the group gradients are
    averaged over and the distributed optimizer shards over (DP x CP)."""
    state = _state()
    return state.data_context_parallel_group if with_context_parallel else state.data_parallel_group


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    state = _state()
    cp = state.context_parallel_size if with_context_parallel else 1
    return state.data_parallel_size * cp


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    return dist.get_rank(get_data_parallel_group(with_context_parallel))


# Model parallel (TP x PP) and embedding --------------------------------------------------------


def get_model_parallel_group() -> dist.ProcessGroup:
    """The TP x PP ranks that together hold one replica of the model."""
    return _state().model_parallel_group


def get_embedding_group() -> dist.ProcessGroup | None:
    """First and last pipeline stage (None on middle stages): they sync tied embeddings."""
    return _state().embedding_group


def get_embedding_global_ranks() -> list[int]:
    return list(_state().embedding_global_ranks)


def is_rank_in_embedding_group() -> bool:
    return _state().embedding_group is not None
