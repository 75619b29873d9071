"""Checkpoints that cannot rot silently: checksums verified at load, raw library errors named,
non-finite state never published.

One real checkpoint is saved at TP=2 on 2 gloo ranks with the distributed optimizer; each test
corrupts a copy of it the way disks and people do (a flipped byte in a model shard, an
optimizer shard or an RNG file, a header whose dtype was changed so that it still parses, a
truncated shard) and loads it on both ranks: every rank refuses with a `CheckpointError` that
names the file. The same corruptions loaded with verification off show what the checksums
prevent: a flipped byte loads silently.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from engine import parallel_state
from engine.checkpointing import (
    CheckpointError,
    NonFiniteStateError,
    integrity,
    load_checkpoint,
    read_latest_iteration,
    save_checkpoint,
)
from engine.checkpointing.integrity import checksum_file, verify_files
from tests.checkpointing.test_checkpointing import (
    CONSUMED,
    ITERATION,
    build,
    fake_training,
    stage_weights,
)
from tests.rank_pool import module_pool
from tests.training.test_training import corpus, make_job  # noqa: F401 (a fixture)

pair = module_pool(2)
solo = module_pool(1)

MODEL = "model_tp01_pp00.safetensors"
OPTIM = "optim_tp00_pp00_dp00.safetensors"
RNG = "rng_rank00001.pt"


def save_tp2(directory: str) -> dict[str, torch.Tensor]:
    try:
        chunks, optimizer, scheduler = build(2, 1, distributed=True)
        fake_training(chunks, optimizer, scheduler)
        save_checkpoint(directory, ITERATION, chunks, optimizer, scheduler, CONSUMED)
        return stage_weights(chunks)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def saved(pair, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("tp2")
    return directory, pair.run(save_tp2, str(directory))[0]


def copy_of(saved: tuple[Path, dict], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the checkpoint and its iteration directory."""
    copy = tmp_path / "copy"
    shutil.copytree(saved[0], copy)
    return copy, copy / f"iter_{ITERATION:07d}"


def data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts (after the 8-byte length and header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt(final: Path, how: str) -> Path:
    """Damage one file of the checkpoint ``final`` as ``how`` says; return that file."""
    if how in ("model byte", "optimizer byte"):
        path = final / (MODEL if how == "model byte" else OPTIM)
        start = data_offset(path)
        flip_byte(path, start + (path.stat().st_size - start) // 2)
    elif how == "rng byte":
        path = final / RNG
        flip_byte(path, path.stat().st_size // 2)
    elif how == "header dtype":  # same length: the header still parses, the data is reread
        path = final / MODEL
        data = path.read_bytes()
        header = data[: data_offset(path)]
        assert b'"dtype":"F32"' in header
        path.write_bytes(
            header.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1) + data[len(header) :]
        )
    elif how == "header index":  # the placements claim TP rank 0: parses, misleads
        path = final / MODEL
        data = path.read_bytes()
        header = data[: data_offset(path)]
        assert b'\\"tp_rank\\": 1' in header
        header = header.replace(b'\\"tp_rank\\": 1', b'\\"tp_rank\\": 0')
        path.write_bytes(header + data[len(header) :])
    elif how == "truncated":
        path = final / OPTIM
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    else:
        raise ValueError(how)
    return path


def load_tp2(directory: str, verify: bool = True, mode: str = "full") -> str | None:
    """Load on both ranks; the error's message, or None when it loaded."""
    try:
        chunks, optimizer, scheduler = build(2, 1, distributed=True, init_seed=99)
        try:
            if mode == "full":
                load_checkpoint(directory, chunks, optimizer, scheduler, verify=verify)
            elif mode == "finetune":
                load_checkpoint(directory, chunks, optimizer, scheduler, finetune=True)
            elif mode == "no optimizer":  # as --no-load-optim loads
                load_checkpoint(directory, chunks, None, scheduler)
        except CheckpointError as error:
            return str(error)
        return None
    finally:
        parallel_state.destroy_model_parallel()


def test_every_file_written_has_its_checksum_in_the_metadata(saved):
    final = saved[0] / f"iter_{ITERATION:07d}"
    metadata = json.loads((final / "metadata.json").read_text())
    checksums = metadata["checksums"]
    assert checksums["algorithm"] == "xxh3_64"
    assert sorted(checksums["files"]) == sorted(metadata["files"])
    assert {MODEL, OPTIM, RNG, "model_tp00_pp00.safetensors"} <= set(metadata["files"])
    for name, record in checksums["files"].items():  # hashed while written, equal to the disk
        assert record == checksum_file(final / name), name


def test_crc32_checksums_of_an_engine_without_xxhash_are_verified(saved, tmp_path, monkeypatch):
    copy, final = copy_of(saved, tmp_path)
    metadata = json.loads((final / "metadata.json").read_text())
    with monkeypatch.context() as patched:  # what a save without the xxhash package records
        patched.setattr(integrity, "ALGORITHM", "crc32")
        files = {name: checksum_file(final / name) for name in metadata["files"]}
        metadata["checksums"] = integrity.checksums_record(files)
    assert metadata["checksums"]["algorithm"] == "crc32"
    (final / "metadata.json").write_text(json.dumps(metadata))
    verify_files(final, metadata["files"], metadata)
    flip_byte(final / MODEL, data_offset(final / MODEL) + 5)
    with pytest.raises(CheckpointError, match=r"is corrupt: crc32 of bytes \[0, "):
        verify_files(final, metadata["files"], metadata)


@pytest.mark.parametrize(
    "how", ["model byte", "optimizer byte", "rng byte", "header dtype", "header index", "truncated"]
)
def test_a_corrupt_file_is_refused_naming_it_on_every_rank(pair, saved, tmp_path, how):
    copy, final = copy_of(saved, tmp_path)
    path = corrupt(final, how)
    messages = pair.run(load_tp2, str(copy))
    for message in messages:
        assert message is not None and str(path) in message, messages
    assert "is corrupt" in messages[int(path.name in (MODEL, RNG))]  # the rank that reads it
    if how == "truncated":
        assert "bytes on disk" in messages[0]
    unverified = pair.run(load_tp2, str(copy), False)
    if how in ("model byte", "optimizer byte", "rng byte", "header dtype"):
        # What the checksums are for: without them, this corruption loads silently.
        assert unverified == [None, None], unverified
    elif how == "header index":  # without checksums: a misleading "partial checkpoint"
        assert all(m is not None and "partial checkpoint" in m for m in unverified), unverified
    else:  # a truncated file fails to parse: still a CheckpointError naming it
        assert all(m is not None and str(path) in m for m in unverified), unverified


def test_weights_only_loads_refuse_a_flipped_model_byte(pair, saved, tmp_path):
    copy, final = copy_of(saved, tmp_path)
    path = corrupt(final, "model byte")
    for mode in ("finetune", "no optimizer"):
        messages = pair.run(load_tp2, str(copy), True, mode)
        assert all(m is not None and str(path) in m for m in messages), (mode, messages)


def load_unverified_raising(directory: str) -> tuple[str, str]:
    """Load with verification off on one rank: the library error, wrapped."""
    try:
        chunks, optimizer, scheduler = build(1, 1, False, init_seed=99)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(directory, chunks, optimizer, scheduler, verify=False)
        return str(error.value), type(error.value.__cause__).__name__
    finally:
        parallel_state.destroy_model_parallel()


def test_raw_library_errors_are_wrapped_naming_the_file(solo, tmp_path):
    """A truncated safetensors file, a metadata.json that is no JSON, an RNG file that is no
    pickle: `CheckpointError` naming the file, chained from the library's error."""
    solo.run(save_one_rank, str(tmp_path / "ckpt"))
    final = tmp_path / "ckpt" / f"iter_{ITERATION:07d}"
    cases = {
        "model_tp00_pp00.safetensors": (lambda p: p.write_bytes(p.read_bytes()[:50]),
                                        SafetensorError),
        "rng_rank00000.pt": (lambda p: p.write_bytes(b"not a pickle at all"), Exception),
        "metadata.json": (lambda p: p.write_text(p.read_text()[:-20]), json.JSONDecodeError),
    }  # fmt: skip
    for name, (damage, cause) in cases.items():
        copy = tmp_path / name
        shutil.copytree(tmp_path / "ckpt", copy)
        damage(copy / final.name / name)
        message, cause_name = solo.run(load_unverified_raising, str(copy))[0]
        assert str(copy / final.name / name) in message, message
        assert cause_name == cause.__name__ or cause is Exception, (name, cause_name)


def save_one_rank(directory: str) -> None:
    try:
        chunks, optimizer, scheduler = build(1, 1, False)
        fake_training(chunks, optimizer, scheduler, steps=1)
        save_checkpoint(directory, ITERATION, chunks, optimizer, scheduler, CONSUMED)
    finally:
        parallel_state.destroy_model_parallel()


def load_twice_capturing_warnings(directory: str) -> list[str]:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("engine.checkpointing.integrity")
    logger.addHandler(handler)
    try:
        chunks, optimizer, scheduler = build(1, 1, False, init_seed=99)
        for _ in range(2):
            load_checkpoint(directory, chunks, optimizer, scheduler)
        return records
    finally:
        logger.removeHandler(handler)
        parallel_state.destroy_model_parallel()


def test_a_checkpoint_without_checksums_loads_with_one_warning(solo, tmp_path):
    solo.run(save_one_rank, str(tmp_path))
    path = tmp_path / f"iter_{ITERATION:07d}" / "metadata.json"
    metadata = json.loads(path.read_text())
    del metadata["checksums"]  # as an older engine wrote it
    path.write_text(json.dumps(metadata))
    warnings = solo.run(load_twice_capturing_warnings, str(tmp_path))[0]
    assert len(warnings) == 1 and "records no checksums" in warnings[0], warnings


# Non-finite state is never published ----------------------------------------------------------


def save_with_nan(directory: str, where: str) -> list[str]:
    """A good save at iteration 3, then a NaN planted (on rank 1 only) and a save at 4 with
    keep_last_n=1: refused on every rank; the messages."""
    try:
        chunks, optimizer, scheduler = build(2, 1, distributed=True)
        fake_training(chunks, optimizer, scheduler)
        save_checkpoint(directory, 3, chunks, optimizer, scheduler, CONSUMED, keep_last_n=1)
        if torch.distributed.get_rank() == 1:
            with torch.no_grad():
                if where == "weights":
                    next(chunks[0].module.parameters()).view(-1)[5] = math.nan
                else:
                    shard = optimizer.shards[-1]
                    optimizer.optimizer.state[shard.main_param]["exp_avg"].view(-1)[0] = math.inf
        with pytest.raises(NonFiniteStateError) as error:
            save_checkpoint(directory, 4, chunks, optimizer, scheduler, CONSUMED, keep_last_n=1)
        return [str(error.value)]
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("where", ["weights", "optimizer state"])
def test_non_finite_state_is_never_published(pair, tmp_path, where):
    messages = [m for ms in pair.run(save_with_nan, str(tmp_path), where) for m in ms]
    state = "model/" if where == "weights" else "exp_avg/"
    for message in messages:  # every rank names the tensor, its file and the rank
        assert "not saved" in message and "on rank 1" in message and state in message, message
    assert read_latest_iteration(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003", "latest_checkpointed_iteration.txt",
    ]  # fmt: skip
    assert pair.run(load_tp2, str(tmp_path)) == [None, None]  # the last good one is intact


def trainer_save_with_nan(data: str, save: str) -> tuple[str | None, str | None, list[str]]:
    """`engine.training.checkpoint.save` on a real `TrainingRun`: saves, then, with a NaN
    in a weight, returns None and logs which checkpoint is still the last good one."""
    from engine.training import checkpoint as ckpt
    from engine.training.state import TrainingRun

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("engine.training.checkpoint").addHandler(handler)
    try:
        run = TrainingRun(make_job(data, 1, 1, checkpoint={"save": save}), torch.device("cpu"))
        run.iteration = 2
        good = ckpt.save(run)
        with torch.no_grad():
            next(run.chunks[0].parameters()).view(-1)[0] = math.nan
        run.iteration = 4
        return good, ckpt.save(run), records
    finally:
        logging.getLogger("engine.training.checkpoint").removeHandler(handler)
        parallel_state.destroy_model_parallel()


def test_the_trainer_logs_a_refused_save_and_keeps_the_last_good_one(solo, corpus, tmp_path):  # noqa: E501, F811
    good, refused, logged = solo.run(trainer_save_with_nan, corpus, str(tmp_path))[0]
    assert good == str(tmp_path / "iter_0000002") and refused is None
    assert len(logged) == 1 and logged[0].startswith("not saved"), logged
    assert logged[0].endswith(f"the last good checkpoint is {tmp_path / 'iter_0000002'}")
    assert read_latest_iteration(tmp_path) == 2
