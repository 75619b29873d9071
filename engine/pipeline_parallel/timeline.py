"""Measuring a pipeline schedule: what each rank did when, and the bubble it left.

A `ScheduleRecorder` passed to a schedule (``recorder=``) records, on its rank:

- the start and end of every forward and backward of every microbatch (and model chunk),
- every point-to-point call (posting + waiting: the time the rank waited on its neighbours),
- the number of in-flight microbatches (forwards whose backward has not run yet, i.e. the
  stored activations), after every change, and its peak.

Times are ``time.perf_counter()`` seconds. On Linux that clock is CLOCK_MONOTONIC, shared by
all processes of one machine, so records of ranks on the same host can be laid side by side;
across hosts, compare each rank's own fractions only.

The bubble of a step is the fraction of the step's wall time (first start to last end over
all ranks) during which a rank computes nothing, averaged over ranks. With equal-cost stages
the theory (Narayanan et al. 2021) is ``(p-1)/(m+p-1)`` for 1F1B and ``(p-1)/(v·m+p-1)`` with
v interleaved chunks per rank; `engine.pipeline_parallel.bubble` builds such stages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Span:
    """One forward or backward of one microbatch on one model chunk, or one p2p call."""

    kind: str
    """"forward", "backward" or "comm"."""
    microbatch: int
    chunk: int
    start_s: float
    end_s: float


@dataclass
class ScheduleRecorder:
    """Per-rank record of one or more schedule runs (see the module docstring)."""

    rank: int = 0
    pipeline_size: int = 1
    num_microbatches: int = 0
    virtual_size: int = 1
    """The run's layout, filled in by the schedule."""
    spans: list[Span] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    in_flight_trace: list[tuple[float, int]] = field(default_factory=list)
    """(time, in-flight count) after every forward and backward."""

    @contextmanager
    def span(self, kind: str, microbatch: int, chunk: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.spans.append(Span(kind, microbatch, chunk, start, time.perf_counter()))

    def add_comm(self, start_s: float, end_s: float) -> None:
        self.spans.append(Span("comm", -1, -1, start_s, end_s))

    def activation_stored(self) -> None:
        """A forward kept its activations for a later backward."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.in_flight_trace.append((time.perf_counter(), self.in_flight))

    def activation_freed(self) -> None:
        """A backward released a microbatch's activations."""
        self.in_flight -= 1
        self.in_flight_trace.append((time.perf_counter(), self.in_flight))

    def compute_s(self) -> float:
        """Seconds spent in forwards and backwards."""
        return sum(s.end_s - s.start_s for s in self.spans if s.kind != "comm")

    def comm_s(self) -> float:
        """Seconds spent in p2p calls (mostly waiting for a neighbour)."""
        return sum(s.end_s - s.start_s for s in self.spans if s.kind == "comm")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScheduleRecorder:
        spans = [Span(**s) for s in data["spans"]]
        trace = [tuple(t) for t in data["in_flight_trace"]]
        return cls(**{**data, "spans": spans, "in_flight_trace": trace})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> ScheduleRecorder:
        return cls.from_dict(json.loads(Path(path).read_text()))


def theoretical_bubble(pipeline_size: int, num_microbatches: int, virtual_size: int = 1) -> float:
    """Idle fraction of a step with equal-cost stages: ``(p-1)/(v·m+p-1)``."""
    p, m, v = pipeline_size, num_microbatches, virtual_size
    return (p - 1) / (v * m + p - 1)


def measured_bubble(recorders: list[ScheduleRecorder]) -> float:
    """Mean over ranks of the fraction of the step's wall time a rank computed nothing.

    The step runs from the first forward to the last backward over all ranks.
    """
    compute = [[s for s in r.spans if s.kind != "comm"] for r in recorders]
    start = min(s.start_s for spans in compute for s in spans)
    end = max(s.end_s for spans in compute for s in spans)
    idle = [1.0 - sum(s.end_s - s.start_s for s in spans) / (end - start) for spans in compute]
    return sum(idle) / len(idle)


def format_report(recorders: list[ScheduleRecorder]) -> str:
    """Per-rank compute / communication / peak in-flight table and the bubble vs theory."""
    pipeline_size, virtual_size = recorders[0].pipeline_size, recorders[0].virtual_size
    num_microbatches = recorders[0].num_microbatches
    start = min(s.start_s for r in recorders for s in r.spans)
    end = max(s.end_s for r in recorders for s in r.spans)
    lines = [f"{'rank':>4} {'compute_s':>10} {'comm_wait_s':>11} {'peak_in_flight':>14}"]
    for r in recorders:
        lines.append(
            f"{r.rank:>4} {r.compute_s():>10.4f} {r.comm_s():>11.4f} {r.peak_in_flight:>14}"
        )
    theory = theoretical_bubble(pipeline_size, num_microbatches, virtual_size)
    lines.append(
        f"step {end - start:.4f} s | p={pipeline_size} m={num_microbatches} v={virtual_size} | "
        f"bubble measured {measured_bubble(recorders):.3f} theory {theory:.3f}"
    )
    return "\n".join(lines)


def plot_timeline(recorders: list[ScheduleRecorder], path: str | Path, title: str = "") -> None:
    """Draw one row per rank (forwards light, backwards dark, p2p waits grey) as a PNG.

    Needs matplotlib (an optional dependency); raises ImportError saying so otherwise.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "drawing the timeline needs matplotlib: pip install matplotlib"
        ) from error
    origin = min(s.start_s for r in recorders for s in r.spans)
    colours = {"forward": "tab:blue", "backward": "tab:green", "comm": "lightgrey"}
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(recorders) + 1.2))
    for row, recorder in enumerate(recorders):
        for s in recorder.spans:
            y, height = (row - 0.15, 0.3) if s.kind == "comm" else (row - 0.4, 0.8)
            # Later model chunks are drawn lighter, so interleaving is visible.
            alpha = 0.6 if s.chunk > 0 else 1.0
            bar = [(s.start_s - origin, s.end_s - s.start_s)]
            ax.broken_barh(bar, (y, height), facecolors=colours[s.kind], alpha=alpha)
            if s.kind != "comm":
                label = f"{s.microbatch}" + (f".{s.chunk}" if s.chunk > 0 else "")
                middle = (s.start_s + s.end_s) / 2 - origin
                ax.text(middle, row, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(recorders)), [f"rank {r.rank}" for r in recorders])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title or "pipeline schedule (blue forward, green backward, grey p2p)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
