"""Plot a training run from its TensorBoard event files: one PNG of the loss (training and
validation on the same axes), the learning rate, the gradient norm, the throughput and the
memory, each against the iteration::

    python tools/plot_run.py /tmp/engine-quickstart/tensorboard --output run.png

Reads every event file in the directory the run's ``--tensorboard-dir`` names (a stopped and
resumed run writes one per launch), as TensorBoard does: in order, points of an overlapping
restart replacing the old ones. A panel whose scalars the run did not log is left out, and
named on stderr. Needs tensorboard and matplotlib (``pip install -e '.[quickstart]'``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EVENT_FILES = "events.out.tfevents.*"


@dataclass(frozen=True)
class Panel:
    """One axes of the figure: its title, y label and (tag, legend label) lines."""

    title: str
    ylabel: str
    lines: tuple[tuple[str, str], ...]


PANELS = (
    Panel("loss", "cross entropy", (("train/loss", "train"), ("validation/loss", "validation"))),
    Panel("learning rate", "lr", (("train/lr", "lr"),)),
    Panel("grad norm", "global L2 norm", (("train/grad_norm", "grad norm"),)),
    Panel("throughput", "tokens/s", (("train/tokens_per_s", "tokens/s"),)),
    Panel("memory", "GB", (("memory/mem_gb", "peak allocated"), ("memory/rss_gb", "peak RSS"))),
)
"""The panels, in the figure's order (the engine's tags, `IterationLog.scalars`)."""


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files directly in ``logdir``: (iteration, value) points.

    Raises FileNotFoundError naming the directory when it holds no event file.
    """
    directory = Path(logdir)
    if not directory.is_dir() or not any(directory.glob(EVENT_FILES)):
        raise FileNotFoundError(
            f"{directory}: no TensorBoard event files ({EVENT_FILES}) there; give the "
            "directory a run's --tensorboard-dir named"
        )
    from tensorboard.backend.event_processing import event_accumulator  # type: ignore

    # A size guidance of 0 keeps every point (TensorBoard samples down to 10,000 by default).
    events = event_accumulator.EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def plot_run(logdir: str | Path, output: str | Path) -> Figure:
    """Write the PNG of the run in ``logdir`` to ``output``; returns the figure (one axes per
    panel with data, titled as in `PANELS`). Panels left out are named on stderr."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scalars = read_scalars(logdir)
    shown = [panel for panel in PANELS if any(tag in scalars for tag, _ in panel.lines)]
    for panel in PANELS:
        if panel not in shown:
            tags = " or ".join(tag for tag, _ in panel.lines)
            print(f"plot_run: no {panel.title} panel: the run logged no {tags}", file=sys.stderr)
    if not shown:
        raise ValueError(f"{logdir}: the event files hold none of the scalars to plot")
    columns = 1 if len(shown) == 1 else 2
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(6 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # rendered by Agg: no display needed
    figure.suptitle(str(logdir))
    for index, panel in enumerate(shown):
        axes = figure.add_subplot(rows, columns, index + 1)
        for tag, label in panel.lines:
            if tag not in scalars:
                continue
            steps, values = zip(*scalars[tag], strict=True)
            sparse = len(steps) < len(scalars.get("train/loss", ())) or len(steps) == 1
            axes.plot(steps, values, label=label, marker="o" if sparse else None)
        axes.set_title(panel.title)
        axes.set_xlabel("iteration")
        axes.set_ylabel(panel.ylabel)
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations
        if len(panel.lines) > 1:  # which of the tags it is, even when one line is drawn
            axes.legend()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", help="the run's --tensorboard-dir")
    parser.add_argument("--output", help="the PNG to write (default: LOGDIR/run.png)")
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.logdir) / "run.png")
    try:
        figure = plot_run(args.logdir, output)
    except (FileNotFoundError, ValueError) as error:
        print(f"plot_run.py: error: {error}", file=sys.stderr)
        return 1
    titles = ", ".join(axes.get_title() for axes in figure.axes)
    print(f"wrote {output} ({titles})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
