"""Autotuning policy of the flash attention kernels: candidate configs and their pruning.

Kept apart from `kernels.flash_attention` so the kernels read top to bottom; the numbers here
are what changes from one GPU generation to the next.
"""

from __future__ import annotations

from functools import partial

from kernels._triton import interpreting, triton

# (BLOCK_M, BLOCK_N) candidates per kernel, each tried with 4 and 8 warps and 2-4 pipeline
# stages: 2-3 stages suit Ampere (A100: 164 KB shared memory a block), 3-4 stages with 8 warps
# Hopper (H100: 227 KB). The dK/dV kernel keeps a key block resident while queries stream, so
# it wants wide key blocks; the forward and dQ kernels the reverse.
BLOCKS = {
    "forward": [(128, 64), (128, 128), (64, 64), (64, 32)],
    "dkdv": [(32, 128), (64, 128), (32, 64), (64, 64), (32, 32)],
    "dq": [(128, 64), (64, 64), (128, 32), (64, 32)],
}
# Under the interpreter: one small config, so tests neither tune nor loop over big tiles, and
# BLOCK_M != BLOCK_N so that tiles straddle the causal diagonal unevenly.
INTERPRETER_BLOCKS = {"forward": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}
# Retune per head dim, power-of-two sequence bucket, causal and packed, not per exact length.
TUNE_KEY = ["HEAD_DIM", "seq_bucket", "IS_CAUSAL", "HAS_DOCS"]

# What each kernel keeps resident for its whole loop and what it streams, per block row:
# (resident block, fp32 accumulators, input tiles resident, streamed block, tiles streamed).
# Forward: acc and q for a query block, K and V streamed. dK/dV: dk, dv, k, v for a key block,
# q and dO streamed. dQ: dq, q, dO for a query block, K and V streamed.
_FOOTPRINTS = {
    "forward": ("BLOCK_M", 1, 1, "BLOCK_N", 2),
    "dkdv": ("BLOCK_N", 2, 2, "BLOCK_M", 2),
    "dq": ("BLOCK_M", 1, 2, "BLOCK_N", 2),
}
_MAX_RESIDENT_REGISTERS = 128  # per thread, of 255: the score tiles need the rest
_SHARED_MEMORY_BYTES = 160 * 1024  # fits A100 and H100


def _configs(kernel: str) -> list:
    """The candidate `triton.Config`s of one kernel (a single one under the interpreter)."""
    if interpreting():
        m, n = INTERPRETER_BLOCKS[kernel]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in BLOCKS[kernel]
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def prune_configs(configs: list, named_args: dict, *, kernel: str, **kwargs) -> list:
    """Drop configs that would spill registers or overflow shared memory, before tuning.

    Spilling is the trap for head dims 128-256: e.g. dK/dV with 128-key blocks and 4 warps
    holds 2 x 128 x 128 fp32 accumulators plus K and V, about 384 registers a thread, and ptxas
    spills kilobytes to local memory. A coarse estimate; a config that still overflows shared
    memory fails to compile and the autotuner skips it (OutOfResources).
    """
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    element_bytes = named_args["Q"].element_size()
    resident, accumulators, inputs, streamed, streamed_tiles = _FOOTPRINTS[kernel]

    def registers(config) -> float:
        rows = config.kwargs[resident]
        resident_bytes = rows * head_dim * (4 * accumulators + element_bytes * inputs)
        return resident_bytes / 4 / (32 * config.num_warps)

    def shared_bytes(config) -> int:
        buffers = streamed_tiles * (config.num_stages - 1) * config.kwargs[streamed]
        return (buffers + inputs * config.kwargs[resident]) * head_dim * element_bytes

    kept = [
        c
        for c in configs
        if registers(c) <= _MAX_RESIDENT_REGISTERS and shared_bytes(c) <= _SHARED_MEMORY_BYTES
    ]
    return kept or [min(configs, key=lambda c: (registers(c), shared_bytes(c)))]


def tuning(kernel: str) -> dict:
    """Keyword arguments of `kernels._triton.autotune` for "forward", "dkdv" or "dq"."""
    prune = partial(prune_configs, kernel=kernel)
    return dict(configs=partial(_configs, kernel), key=TUNE_KEY,
                prune_configs_by={"early_config_prune": prune})  # fmt: skip
