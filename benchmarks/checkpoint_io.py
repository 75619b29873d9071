"""Checkpoint I/O: synchronous against ``--async-save``, and loads with and without checksum
verification, against the raw disk speed of the same bytes.

    python benchmarks/checkpoint_io.py [--size-mb 400] [--rounds 3] [--dir /tmp] [--warm]

One process (a gloo group of one), a LLaMA whose fp32 weights plus AdamW state (main params
and both moments: 16 bytes a parameter) come to about ``--size-mb``. Every round measures, in
an order that alternates from round to round so that both sides of each pair see the same
machine state:

- the **stall**: how long the save call blocks the training loop (sync: the whole save;
  async: the copy to host memory), and the wall time until the checkpoint is **published**
  (async: polling every 5 ms, as a loop's iteration boundaries would);
- **raw write**: the same file sizes written with plain ``write`` + ``fsync``;
- **load** with verification (CRC-32 of every file read, `engine.checkpointing.integrity`)
  and without (``verify=False``), and the **raw read** of the same bytes. Before each read
  the files are dropped from the page cache (``posix_fadvise(DONTNEED)``), as a restarted
  job finds them; ``--warm`` keeps them cached (the worst case for verification's share).

First the hashes the checksum could use, measured here (GB/s on one core). Best of the rounds
(the machine may be shared: the best is the least disturbed); the ratios are printed last, the
last line ``verify_overhead_pct=X.X``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import parallel_state  # noqa: E402
from engine.checkpointing import (  # noqa: E402
    load_checkpoint,
    save_checkpoint,
    save_checkpoint_async,
)
from engine.checkpointing.integrity import HASHERS  # noqa: E402
from engine.device import init_distributed  # noqa: E402
from engine.distributed import DistributedDataParallel  # noqa: E402
from engine.models import ModelConfig  # noqa: E402
from engine.models.build import build_model_chunks  # noqa: E402
from engine.optimizer import build_lr_scheduler, build_optimizer  # noqa: E402
from engine.optimizer.config import OptimizerConfig  # noqa: E402

BYTES_PER_PARAM = 16  # fp32 weight + fp32 main param + exp_avg + exp_avg_sq


def model_config(size_mb: float) -> ModelConfig:
    """A LLaMA of about ``size_mb`` of state: h=512 and a vocabulary of 8000 with as many
    layers as fit (at least one); narrower for sizes below one such layer (smoke tests)."""

    def config(hidden: int, layers: int) -> ModelConfig:
        return ModelConfig.from_preset(
            "tiny", num_layers=layers, hidden_size=hidden, ffn_hidden_size=hidden * 11 // 4,
            num_attention_heads=8, num_query_groups=4, vocab_size=16 * hidden,
        )  # fmt: skip

    def state_bytes(c: ModelConfig) -> int:
        shapes = c.inventory().canonical_shapes().values()
        return BYTES_PER_PARAM * sum(torch.Size(s).numel() for s in shapes)

    hidden = next((h for h in (512, 256, 128) if state_bytes(config(h, 1)) <= size_mb * 1e6), 64)
    per_layer = state_bytes(config(hidden, 2)) - state_bytes(config(hidden, 1))
    fixed = state_bytes(config(hidden, 1)) - per_layer
    return config(hidden, max(1, round((size_mb * 1e6 - fixed) / per_layer)))


def hash_speeds() -> dict[str, float]:
    """GB/s of each candidate over 64 MB, in 16 MiB pieces, best of 3."""
    data = memoryview(os.urandom(64 << 20))
    pieces = [data[i : i + (16 << 20)] for i in range(0, len(data), 16 << 20)]

    def crc32() -> None:
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)

    def hashlib_of(name: str) -> Callable[[], None]:
        def run() -> None:
            h = hashlib.new(name)
            for piece in pieces:
                h.update(piece)

        return run

    def xxh3_64() -> None:
        h = HASHERS["xxh3_64"]()
        for piece in pieces:
            h.update(piece)

    candidates = [("crc32", crc32), ("sha256", hashlib_of("sha256")),
                  ("blake2b", hashlib_of("blake2b")), ("md5", hashlib_of("md5"))]  # fmt: skip
    if "xxh3_64" in HASHERS:
        candidates.insert(0, ("xxh3_64", xxh3_64))
    out = {}
    for name, fn in candidates:
        best = min(timed(fn) for _ in range(3))
        out[name] = len(data) / best / 1e9
    return out


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (they are clean: written and fsynced)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(directory: Path, sizes: dict[str, int], data: bytes) -> list[Path]:
    """Files of the given sizes, plain writes of 16 MiB + fsync each."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    paths = []
    for name, size in sizes.items():
        path = directory / name
        with open(path, "wb") as f:
            for start in range(0, size, 16 << 20):
                f.write(data[: min(16 << 20, size - start)])
            f.flush()
            os.fsync(f.fileno())
        paths.append(path)
    return paths


def raw_read(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=400.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--warm", action="store_true", help="load from the page cache")
    args = parser.parse_args()

    speeds = hash_speeds()
    print("hash GB/s (one core): " + ", ".join(f"{k} {v:.2f}" for k, v in speeds.items()))

    init_distributed()
    parallel_state.initialize_model_parallel()
    config = model_config(args.size_mb)
    chunks = [DistributedDataParallel(c) for c in build_model_chunks(config)]
    optimizer_config = OptimizerConfig(lr=1e-4)
    optimizer = build_optimizer(optimizer_config, chunks)
    scheduler = build_lr_scheduler(optimizer, optimizer_config, train_iters=100)
    for buffer in (b for chunk in chunks for b in chunk.grad_buffers):  # Adam state exists
        buffer.grad_data.normal_(std=1e-3)
    optimizer.step()

    root = Path(args.dir or tempfile.mkdtemp(prefix="checkpoint_io_"))
    root.mkdir(parents=True, exist_ok=True)
    sync_dir, async_dir, raw_dir = root / "sync", root / "async", root / "raw"
    figures: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        figures.setdefault(name, []).append(seconds)

    def sync_save(iteration: int) -> None:
        record("sync stall", timed(lambda: save_checkpoint(
            sync_dir, iteration, chunks, optimizer, scheduler, 0, keep_last_n=1)))  # fmt: skip
        record("sync published", figures["sync stall"][-1])

    def async_save(iteration: int) -> None:
        started = time.perf_counter()
        pending = save_checkpoint_async(
            async_dir, iteration, chunks, optimizer, scheduler, 0, keep_last_n=1
        )
        record("async stall", time.perf_counter() - started)
        while pending.poll() is None:
            time.sleep(0.005)  # the loop's iterations, polling at each boundary
        record("async published", time.perf_counter() - started)

    sync_save(0)  # warm-up; also gives the files' sizes
    files = sorted((sync_dir / "iter_0000000").iterdir())
    sizes = {p.name: p.stat().st_size for p in files if p.name != "metadata.json"}
    nbytes = sum(sizes.values())
    data = os.urandom(16 << 20)
    print(
        f"model: {config.num_layers} layers, h={config.hidden_size}, vocab {config.vocab_size}:"
        f" {nbytes / 1e6:.0f} MB a checkpoint in {len(sizes)} files; {args.rounds} rounds in "
        f"{root}; loads from {'the page cache' if args.warm else 'disk (pages evicted)'}"
    )

    def load(verify: bool, iteration: int) -> None:
        if not args.warm:
            evict(sorted(sync_dir.glob("iter_*/*")))
        name = "load verified" if verify else "load unverified"
        record(name, timed(lambda: load_checkpoint(
            sync_dir, chunks, optimizer, scheduler, verify=verify)))  # fmt: skip

    def raw(iteration: int) -> None:
        record("raw write", timed(lambda: raw_write(raw_dir, sizes, data)))
        paths = sorted(raw_dir.iterdir())
        if not args.warm:
            evict(paths)
        record("raw read", timed(lambda: raw_read(paths)))

    for round_ in range(1, args.rounds + 1):
        steps: list[Callable[[int], None]] = [
            sync_save,
            async_save,
            raw,
            lambda i: load(True, i),
            lambda i: load(False, i),
        ]
        if round_ % 2 == 0:
            steps.reverse()
        for step in steps:
            step(round_)

    best = {name: min(values) for name, values in figures.items()}
    for name in ("sync stall", "async stall", "sync published", "async published",
                 "raw write", "load verified", "load unverified", "raw read"):  # fmt: skip
        print(f"{name:16s} {best[name]:8.3f} s  {nbytes / best[name] / 1e6:8.0f} MB/s")
    if args.dir is None:
        shutil.rmtree(root)
    print(f"async_stall_over_sync_stall={best['async stall'] / best['sync stall']:.3f}")
    print(f"sync_save_over_raw_write={best['raw write'] / best['sync published']:.2f}")
    print(f"async_save_over_raw_write={best['raw write'] / best['async published']:.2f}")
    print(f"load_verified_over_raw_read={best['raw read'] / best['load verified']:.2f}")
    print(f"load_unverified_over_raw_read={best['raw read'] / best['load unverified']:.2f}")
    overhead = best["load verified"] / best["load unverified"] - 1
    print(f"verify_overhead_pct={100 * overhead:.1f}")


if __name__ == "__main__":
    main()
