"""Checkpoint directories on disk: names, the ``latest`` pointer, atomic publication.

A save writes into ``iter_0000100.tmp/``, which `publish` renames to ``iter_0000100`` once
complete; ``latest_checkpointed_iteration.txt`` is replaced (`write_text_atomic`) only after
that, and `keep_last` deletes older iterations only after *that*, each renamed to ``*.trash``
before its removal so that a half-deleted directory is never taken for a checkpoint.
`remove_stale` clears what killed saves and deletions left behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

LATEST_FILE = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model being loaded."""


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    """``save_dir/iter_0000100`` for iteration 100."""
    return Path(save_dir) / f"iter_{iteration:07d}"


def read_latest_iteration(load_dir: str | Path) -> int | None:
    """The iteration ``latest_checkpointed_iteration.txt`` names, or None without one."""
    path = Path(load_dir) / LATEST_FILE
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold an iteration number, found {text!r}")
    return int(text)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that readers see the old content or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place (replacing an older save of the same
    iteration: moved aside first, deleted after)."""
    old = None
    if final.exists():
        old = final.with_name(final.name + ".trash")
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def remove_stale(save_dir: Path) -> None:
    """Directories left by saves or deletions that were killed (never a published one)."""
    for path in save_dir.iterdir():
        if path.is_dir() and path.suffix in (".tmp", ".trash"):
            shutil.rmtree(path)


def keep_last(save_dir: Path, keep_last_n: int, just_saved: int) -> None:
    """Delete all published iterations but the newest ``keep_last_n`` (never ``just_saved``)."""
    found = sorted(
        int(m.group(1)) for p in save_dir.iterdir() if (m := _ITER_DIR.match(p.name)) and p.is_dir()
    )
    for iteration in found[:-keep_last_n]:
        if iteration == just_saved:
            continue
        path = iteration_dir(save_dir, iteration)
        trash = path.with_name(path.name + ".trash")
        path.rename(trash)  # a directory half deleted is never mistaken for a checkpoint
        shutil.rmtree(trash)
