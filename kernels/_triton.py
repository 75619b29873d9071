"""What the kernel files share: an optional Triton import and the checks made before a launch.

Importing `kernels` must work without Triton (CPU-only installs, macOS), so Triton is imported
here inside a guard; the kernel files use ``from __future__ import annotations`` so that their
``tl.constexpr`` annotations stay strings until Triton compiles them. Calling a kernel without
Triton raises a clear ImportError instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the package still imports; launches call require_triton()
    triton = None
    tl = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

__all__ = ["triton", "tl", "jit", "autotune", "interpreting", "require_triton", "check_device"]


def jit(fn: Callable) -> Any:
    """``triton.jit`` when Triton is importable, else the plain function (never launched).

    Typed Any: a Triton kernel is launched as ``kernel[grid](...)``, which a function is not.
    """
    return triton.jit(fn) if triton is not None else fn


def autotune(configs: Callable[[], list], key: list[str], **kwargs: Any) -> Callable:
    """``triton.autotune`` over ``configs()``; the identity when Triton is absent.

    ``configs`` is a function so that ``triton.Config`` is only touched when Triton exists.
    """
    if triton is None:
        return lambda fn: fn
    return triton.autotune(configs=configs(), key=key, **kwargs)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is decorated, i.e. when its module is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def require_triton() -> None:
    """Raise a clear ImportError when Triton is not installed."""
    if _IMPORT_ERROR is not None:
        raise ImportError(
            "the Triton kernels need the `triton` package (pip install 'triton>=3.0', or "
            "the engine's [triton] extra); use the PyTorch backends without it"
        ) from _IMPORT_ERROR


def check_device(kernel: Any, *tensors: torch.Tensor) -> None:
    """Refuse tensors the kernel cannot reach, with the fix in the message.

    Triton compiles for the device the tensors live on (CUDA, ROCm); CPU tensors work only
    when the kernels were decorated under the interpreter.
    """
    require_triton()
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    from triton.runtime.interpreter import InterpretedFunction

    compiled = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    if device.type == "cpu" and not isinstance(compiled, InterpretedFunction):
        raise RuntimeError(
            "Triton kernels got CPU tensors but were not built for the interpreter: set "
            "TRITON_INTERPRET=1 before the kernels module is first imported, or move the "
            "tensors to a GPU"
        )
