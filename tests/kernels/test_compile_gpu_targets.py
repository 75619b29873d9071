"""The kernels compile for Ampere (sm_80) and Hopper (sm_90) without a GPU.

The interpreter checks the numerics but not that Triton's compiler accepts the kernels (types,
layouts, shared memory). Triton can compile ahead of time for a named target down to a cubin
with its bundled ptxas, so a CPU-only machine still catches compile errors. It runs in a child
process because this one decorated the kernels for the interpreter. Run directly
(``python tests/kernels/test_compile_gpu_targets.py``) it prints each kernel's shared memory.
"""

import os
import subprocess
import sys

import pytest

from tests.paths import REPO

triton = pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")

FLOAT_POINTERS = {"LSE", "DELTA", "RSTD", "DW_PARTIAL"}  # float32 whatever the input dtype
FLOAT_SCALARS = {"qk_scale", "sm_scale", "eps"}

# (target capability, dtype, causal, documents). The default is the training configuration:
# Hopper, bf16 (which the interpreter cannot run), causal + documents (every masking branch).
# The others take about 30 s more of compiling, so they run with ``pytest -m slow``.
DEFAULT_TARGET = (90, "bf16", True, True)
SLOW_TARGETS = [(80, "fp16", True, True), (90, "fp32", False, False)]


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    """Triton types by argument naming convention: pointers are upper case."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("DOC_"):
            signature[name] = "*i32"
        elif name in FLOAT_POINTERS:
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return signature


def compile_all(capability: int, dtype: str, causal: bool, docs: bool) -> None:
    """Compile every kernel for one target; raise on the first failure."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.flash_attention as fa
    import kernels.rmsnorm as rn

    flags = dict(HEAD_DIM=128, IS_CAUSAL=causal, HAS_DOCS=docs,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")  # fmt: skip
    wide, narrow = (64, 32) if dtype == "fp32" else (128, 64)  # fp32 tiles take twice the room
    jobs = [
        (fa._attention_forward_kernel, {**flags, "BLOCK_M": wide, "BLOCK_N": narrow}),
        (fa._attention_backward_dkdv_kernel, {**flags, "BLOCK_M": narrow // 2, "BLOCK_N": wide}),
        (fa._attention_backward_dq_kernel, {**flags, "BLOCK_M": wide, "BLOCK_N": narrow}),
        (fa._attention_backward_preprocess_kernel, {"HEAD_DIM": 128, "BLOCK_M": 64}),
        (rn._rms_norm_forward_kernel, {"HAS_RESIDUAL": True, "BLOCK_N": 4096}),
        (rn._rms_norm_backward_kernel, {"HAS_DSUM": True, "BLOCK_N": 4096}),
    ]
    for kernel, constexprs in jobs:
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        compiled = triton.compile(
            ASTSource(fn, _signature(fn, dtype, constexprs), constexprs),
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=4, num_stages=2 if dtype == "fp32" else 3),
        )
        print(f"sm_{capability} {dtype} {fn.__name__}: {compiled.metadata.shared} B shared")


def _compile_in_child(target: tuple) -> None:
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, __file__, *map(str, target)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("B shared") == 6, result.stdout


def test_kernels_compile_for_hopper_bf16():
    _compile_in_child(DEFAULT_TARGET)


@pytest.mark.slow
@pytest.mark.parametrize("target", SLOW_TARGETS, ids=lambda t: f"sm{t[0]}-{t[1]}")
def test_kernels_compile_for_other_targets(target, request):
    if "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("about 15 s of compiling each; run with `pytest -m slow`")
    _compile_in_child(target)


if __name__ == "__main__":
    capability, dtype, causal, docs = sys.argv[1:5]
    compile_all(int(capability), dtype, causal == "True", docs == "True")
