"""Run the Triton kernels in Triton's CPU interpreter when there is no GPU.

Triton chooses between compiling and interpreting when a function is decorated with
``triton.jit``, and its own library (``tl.sum``, ...) is decorated when ``triton`` is imported.
So ``TRITON_INTERPRET`` must be set before the first ``import triton``. pytest loads this file
before it imports any test module, even with other paths named first on its command line; only
a conftest higher up or a plugin could import triton earlier, and then we stop with the fix.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") is None:
    if "triton" in sys.modules:
        raise pytest.UsageError(
            "tests/kernels: triton was imported before TRITON_INTERPRET could be set, so its "
            "kernels would compile for a GPU this machine lacks; run with TRITON_INTERPRET=1"
        )
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"


@pytest.fixture
def device() -> str:
    """Where the kernel tests put their tensors: the GPU if Triton compiles, else the CPU."""
    return DEVICE
