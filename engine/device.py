"""Where this process runs: the device and the collective backend follow the hardware.

Nothing here hard-codes CUDA; the same code runs on NCCL/CUDA and on gloo/CPU.
"""

import os
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
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A group of one needs no rendezvous over TCP: an in-process store, so no port is
            # picked (and possibly taken by another process between picking and binding).
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return device
