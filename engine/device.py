"""Where this process runs: the device and the collective backend follow the hardware.

Nothing here hard-codes CUDA; the same code runs on NCCL/CUDA and on gloo/CPU.
"""

import gc
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist


def default_device() -> torch.device:
    """The accelerator this rank should use: its local CUDA device if any, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        )
    return torch.device("cpu")


def default_backend() -> str:
    """NCCL when CUDA is there, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Start the default process group from torchrun's environment, once.

    A process started without torchrun (no ``WORLD_SIZE``) becomes a group of one, so that
    single-process runs and scripts take the same code path as multi-rank ones.

    Returns:
        The device this rank computes on.
    """
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend, timeout = backend or default_backend(), timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ:
            store = _torchrun_attempt_store(timeout)
            dist.init_process_group(
                backend=backend,
                timeout=timeout,
                store=store,
                rank=-1 if store is None else int(os.environ["RANK"]),
                world_size=-1 if store is None else int(os.environ["WORLD_SIZE"]),
            )
        else:
            # A group of one needs no rendezvous over TCP: an in-process store, so no port is
            # picked (and possibly taken by another process between picking and binding).
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return device


def leave_distributed(together: bool = True) -> None:
    """Destroy the default process group; with ``together``, after a barrier, so that every
    rank leaves at once: a rank tearing its gloo / NCCL transport down while a peer is still
    in a collective can abort the peer (SIGABRT, seen on gloo under load). ``together=False``
    is for a failure path, where the peers may be gone."""
    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    # Models, DDP / FSDP2 state and pending work objects left in reference cycles would
    # otherwise be freed in the interpreter's teardown, where a gloo work object's destructor
    # can abort the process: free them while the groups are still there.
    gc.collect()
    dist.destroy_process_group()


def _torchrun_attempt_store(timeout: timedelta) -> dist.Store | None:
    """torchrun's own store, with this attempt's keys apart from the earlier attempts'.

    torchrun (2.4 and later) shares its agent's TCPStore with the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that one store across
    ``--max-restarts``, while torch's ``env://`` init adds no per-attempt prefix: a restarted
    worker then finds the killed workers' gloo addresses under the same keys and fails with
    "connectFullMesh failed ... Connection refused" or waits on them (pytorch/pytorch#135712).

    With one torchrun agent, ``TORCHELASTIC_RESTART_COUNT`` names the attempt on every worker.
    With several, it need not: an agent whose workers were healthy restarts them without
    counting, so a prefix could split the group. There, torch's own init is kept and rank 0
    warns when restarts are allowed: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store
    every rendezvous round; the recipes in examples/ set it) is the fix.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if (
            os.environ.get("RANK") == "0"
            and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
        ):
            warnings.warn(
                "torchrun shares one store across restarts on several nodes: a restarted worker "
                "group can read the previous attempt's addresses and fail to connect; set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (with --rdzv-backend c10d)",
                stacklevel=3,
            )
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(
        f"engine/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )
