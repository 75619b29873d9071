"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

Rank order follows Megatron-LM's default: TP ranks are adjacent (fastest varying), then DP,
then PP. With world size W = TP x DP x PP, global rank ``g`` has

    tp_rank = g % TP,   dp_rank = (g // TP) % DP,   pp_rank = g // (TP x DP).

TP ranks are adjacent because TP all-reduces run inside every layer and want the fastest
links (one node's NVLink); PP sends point to point once per microbatch, so it can span nodes.

Every group is created by every rank, in the same order (``new_group`` is collective).
All state lives in one `_ParallelState` object; the getters read it.
"""

from __future__ import annotations

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

    def invalid_sizes(self) -> bool:
        """A size below 1 (nothing else about the layout can then be computed)."""
        vpp = self.virtual_pipeline_model_parallel_size or 1
        return min(self.tensor_model_parallel_size, self.pipeline_model_parallel_size, vpp) < 1

    def errors(self, world_size: int | None = None) -> list[str]:
        """What is wrong with the sizes themselves, or with them on ``world_size`` ranks."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if self.invalid_sizes():
            return [
                f"parallel sizes must be at least 1: --tensor-model-parallel-size {tp}, "
                f"--pipeline-model-parallel-size {pp}, virtual pipeline size "
                f"{self.virtual_pipeline_model_parallel_size or 1}"
            ]
        if world_size is not None and world_size % (tp * pp) != 0:
            return [
                f"world size ({world_size}) must be divisible by --tensor-model-parallel-size "
                f"({tp}) x --pipeline-model-parallel-size ({pp}) = {tp * pp}"
            ]
        return []


@dataclass
class _ParallelState:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    tensor_model_parallel_group: dist.ProcessGroup
    pipeline_model_parallel_group: dist.ProcessGroup
    data_parallel_group: dist.ProcessGroup
    model_parallel_group: dist.ProcessGroup
    embedding_group: dist.ProcessGroup | None
    pipeline_global_ranks: list[int]
    embedding_global_ranks: list[int]
    virtual_pipeline_model_parallel_rank: int | None = None


_STATE: _ParallelState | None = None


def rank_layout(
    world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int
) -> dict[str, list[list[int]]]:
    """The global ranks of every TP, DP, PP and model-parallel (TP x PP) group.

    Pure arithmetic (no communication), so plans and tests can inspect a layout without
    starting it. Raises ValueError when the world size does not factor into TP x PP x DP.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(
            f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) "
            "must be at least 1"
        )
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) "
            f"x --pipeline-model-parallel-size ({pp}) = {tp * pp}"
        )
    dp = world_size // (tp * pp)

    def rank(t: int, d: int, p: int) -> int:
        return t + d * tp + p * tp * dp

    return {
        "tensor": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "data": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pipeline": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "model": [[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    timeout: timedelta | None = None,
) -> None:
    """Build the TP, PP, DP, model-parallel and embedding groups of the running job.

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
    layout = rank_layout(world_size, tensor_model_parallel_size, pipeline_model_parallel_size)

    def my_group(rank_lists: list[list[int]]) -> tuple[dist.ProcessGroup | None, list[int]]:
        mine: tuple[dist.ProcessGroup | None, list[int]] = (None, [])
        for ranks in rank_lists:
            group = _group_for(ranks, timeout)
            if me in ranks:
                mine = (group, ranks)
        return mine

    tp_group, _ = my_group(layout["tensor"])
    dp_group, _ = my_group(layout["data"])
    pp_group, pp_ranks = my_group(layout["pipeline"])
    mp_group, _ = my_group(layout["model"])
    # Each layout partitions the world: every rank is in one of its groups.
    assert tp_group is not None and dp_group is not None
    assert pp_group is not None and mp_group is not None
    # First and last stage of each pipeline (one rank when PP=1); None on middle stages.
    embedding_group, embedding_ranks = my_group(
        [sorted({ranks[0], ranks[-1]}) for ranks in layout["pipeline"]]
    )

    _STATE = _ParallelState(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        data_parallel_size=len(layout["data"][0]),
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        tensor_model_parallel_group=tp_group,
        pipeline_model_parallel_group=pp_group,
        data_parallel_group=dp_group,
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


# Data parallel --------------------------------------------------------------------------------


def get_data_parallel_group() -> dist.ProcessGroup:
    return _state().data_parallel_group


def get_data_parallel_world_size() -> int:
    return _state().data_parallel_size


def get_data_parallel_rank() -> int:
    return dist.get_rank(get_data_parallel_group())


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
