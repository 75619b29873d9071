"""`tools/plot_run.py` on a real run's TensorBoard events: a one-rank run stopped at iteration 2
with a checkpoint and resumed to 4 (two event files, as the quickstart writes), drawn into one PNG
whose panels are the expected ones, each line at the logged iterations; panels without scalars
are left out and named; a directory without event files is a one-line error."""

from __future__ import annotations

import matplotlib.image
import pytest

from engine.training.metrics import TensorBoardWriter
from tests.training.test_training import corpus, make_job, solo, train  # noqa: F401 (fixtures)
from tools.plot_run import main, plot_run

PANELS = ["loss", "learning rate", "grad norm", "throughput", "memory"]


@pytest.fixture(scope="module")
def run(solo, corpus, tmp_path_factory):  # noqa: F811
    """(the losses of iterations 1-4, the validation losses, the TensorBoard dir)."""
    root = tmp_path_factory.mktemp("plotted")
    training = {"train_iters": 4, "log_interval": 1, "eval_interval": 2, "eval_iters": 1,
                "tensorboard_dir": str(root / "tb")}  # fmt: skip
    checkpoint = {"save": str(root / "ckpt"), "load": str(root / "ckpt")}
    job = make_job(corpus, 1, 1, training={**training, "exit_interval": 2}, checkpoint=checkpoint)
    [first] = solo.run(train, job)
    [second] = solo.run(train, make_job(corpus, 1, 1, training=training, checkpoint=checkpoint))
    assert (first.iteration, second.iteration) == (2, 4)
    assert len(list((root / "tb").glob("events.out.tfevents.*"))) == 2
    return {**first.losses, **second.losses}, {**first.evaluations, **second.evaluations}, root


def test_the_png_has_every_panel_with_the_logged_iterations(run, capsys):
    losses, evaluations, root = run
    output = root / "plots" / "run.png"
    figure = plot_run(root / "tb", output)
    assert "no " not in capsys.readouterr().err  # every panel had its scalars

    data = output.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    width, height = figure.get_size_inches() * figure.dpi
    assert matplotlib.image.imread(output).shape == (round(height), round(width), 4)

    assert [axes.get_title() for axes in figure.axes] == PANELS
    loss = figure.axes[0]
    lines = {line.get_label(): line for line in loss.lines}
    assert sorted(lines) == ["train", "validation"]
    assert list(lines["train"].get_xdata()) == [1, 2, 3, 4]  # from both event files
    assert list(lines["train"].get_ydata()) == pytest.approx([losses[i] for i in range(1, 5)])
    assert list(lines["validation"].get_xdata()) == [2, 4]
    assert list(lines["validation"].get_ydata()) == pytest.approx(
        [evaluations[2]["loss"], evaluations[4]["loss"]]
    )
    for axes in figure.axes[1:]:
        [line] = axes.lines
        assert list(line.get_xdata()) == [1, 2, 3, 4], axes.get_title()
        assert axes.get_xlabel() == "iteration"
    assert [line.get_label() for line in figure.axes[-1].lines] == ["peak RSS"]  # on the CPU


def test_the_command_line_writes_beside_the_events_by_default(run, capsys):
    root = run[2]
    assert main([str(root / "tb")]) == 0
    assert f"wrote {root / 'tb' / 'run.png'} ({', '.join(PANELS)})" in capsys.readouterr().out
    assert (root / "tb" / "run.png").stat().st_size > 0


def test_panels_without_scalars_are_left_out_and_named(tmp_path, capsys):
    writer = TensorBoardWriter(str(tmp_path / "tb"))
    for step in (10, 20):
        writer.scalars({"train/loss": 3.0 / step, "train/tokens_per_s": 100.0 * step}, step)
    writer.close()
    figure = plot_run(tmp_path / "tb", tmp_path / "partial.png")
    assert [axes.get_title() for axes in figure.axes] == ["loss", "throughput"]
    err = capsys.readouterr().err
    assert "no learning rate panel: the run logged no train/lr" in err
    assert "no memory panel: the run logged no memory/mem_gb or memory/rss_gb" in err
    assert list(figure.axes[1].lines[0].get_xdata()) == [10, 20]


def test_a_directory_without_event_files_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path), "--output", str(tmp_path / "x.png")]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"plot_run.py: error: {tmp_path}: no TensorBoard event files")
    assert not (tmp_path / "x.png").exists()
