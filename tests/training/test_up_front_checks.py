"""What a run checks before it trains: data ids against the model's vocabulary (naming the
data file and where the vocabulary comes from), and ``--save`` (writable, room for a
checkpoint)."""

from __future__ import annotations

import dataclasses

import pytest

from engine.training.data import build_datasets
from tests.training.test_training import corpus, make_job, solo  # noqa: F401 (fixtures)


def test_data_ids_at_or_above_the_vocab_size_are_refused_naming_the_file(corpus):  # noqa: F811
    job = make_job(corpus, 1, 1)
    job = dataclasses.replace(job, model=dataclasses.replace(job.model, vocab_size=100))
    with pytest.raises(ValueError) as error:
        build_datasets(job, 8, 4, None)
    message = str(error.value)
    assert f"{corpus}.bin: holds token id" in message
    assert "the model (--vocab-size 100) has 100 ids" in message
    build_datasets(make_job(corpus, 1, 1), 8, 4, None)  # the byte corpus fits 256 ids


def train(job):
    from engine.training.loop import pretrain

    try:
        return pretrain(job)
    except ValueError as error:
        return str(error)


def test_an_unwritable_save_stops_the_run_before_the_first_iteration(solo, corpus, tmp_path):  # noqa: F811
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    job = make_job(corpus, 1, 1, checkpoint={"save": str(blocked / "ckpt")})
    [message] = solo.run(train, job)
    assert isinstance(message, str), "trained anyway"
    assert f"--save {blocked / 'ckpt'} is not a writable directory" in message


def test_a_save_without_room_for_one_checkpoint_is_refused(tmp_path):
    from engine.models.config import ModelConfig
    from engine.training.preflight import checkpoint_bytes, save_dir_problem

    llama = ModelConfig.from_preset("llama2-7b")  # fp32: 4 + 12 bytes a parameter
    needed = checkpoint_bytes(llama, with_optimizer=True)
    assert needed == 6_738_415_616 * 16
    assert checkpoint_bytes(llama, with_optimizer=False) == 6_738_415_616 * 4
    problem = save_dir_problem(str(tmp_path / "ckpt"), 10**18, rank=0)  # an exabyte
    assert problem is not None and "GB free, but one checkpoint of this run takes about" in problem
    assert save_dir_problem(str(tmp_path / "ckpt"), 1, rank=0) is None
