"""Where the kernel tests run: compiled on the GPU when there is one (and ``TRITON_INTERPRET``
is unset), else in Triton's CPU interpreter.

Triton chooses between compiling and interpreting when a function is decorated with
``triton.jit``, and its own library (``tl.sum``, ...) is decorated when ``triton`` is imported.
So ``TRITON_INTERPRET`` must be set before the first ``import triton``. pytest loads this file
before it imports any test module, even with other paths named first on its command line; only
a conftest higher up or a plugin could import triton earlier, and then we stop with the fix.

On the GPU (what ``benchmarks/gpu_check.sh`` runs: ``pytest tests/kernels -m "slow or not
slow"``):

- each autotuned attention kernel gets one config, so a test compiles each kernel variant
  once instead of tuning up to 24 configs per head dim, dtype and mask (about ten minutes of
  compiling); the tests check numerics, which every config must get right.
  ``KERNEL_TESTS_AUTOTUNE=1`` keeps the autotuner's full search.
- modules whose kernels run on CPU ranks (gloo processes) are skipped: without the interpreter
  Triton cannot launch on CPU tensors. Run them with ``TRITON_INTERPRET=1``.
"""

import importlib.util
import os
import sys
from pathlib import Path

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

# Modules that launch the kernels on CPU tensors whatever the machine, and why.
CPU_ONLY_MODULES = {
    "test_model_backends.py": "the model runs on gloo ranks on the CPU: needs TRITON_INTERPRET=1",
}
# One (BLOCK_M, BLOCK_N) per autotuned kernel on the GPU: the interpreter's blocks (small
# enough for head dim 256 in float32 within an A100's shared memory, and unequal so that tiles
# straddle the causal diagonal unevenly).
TEST_WARPS, TEST_STAGES = 4, 2


def _one_config_per_kernel() -> None:
    """Replace each attention autotuner's candidates with a single config (no tuning runs)."""
    import triton

    import kernels.flash_attention as fa
    from kernels.flash_attention_tuning import INTERPRETER_BLOCKS

    tuned = {
        "forward": fa._attention_forward_kernel,
        "dkdv": fa._attention_backward_dkdv_kernel,
        "dq": fa._attention_backward_dq_kernel,
    }
    for name, kernel in tuned.items():
        m, n = INTERPRETER_BLOCKS[name]
        kernel.configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=TEST_WARPS,
                          num_stages=TEST_STAGES)
        ]  # fmt: skip


if (
    DEVICE == "cuda"
    and importlib.util.find_spec("triton") is not None
    and os.environ.get("KERNEL_TESTS_AUTOTUNE") != "1"
):
    _one_config_per_kernel()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the GPU, skip the modules that can only run under the interpreter."""
    if DEVICE != "cuda":
        return
    here = Path(__file__).parent
    for item in items:
        path = Path(str(item.fspath))
        reason = CPU_ONLY_MODULES.get(path.name) if path.parent == here else None
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"targeting the GPU: {reason}"))


@pytest.fixture
def device() -> str:
    """Where the kernel tests put their tensors: the GPU if Triton compiles, else the CPU."""
    return DEVICE
