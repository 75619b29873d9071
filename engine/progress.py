"""Progress of a long tool on stderr: a bar redrawn in place on a terminal, lines in a log.

    progress = Progress(total=len(windows), unit="windows", label="perplexity",
                        enabled=rank == 0)
    for batch in batches:
        ...
        progress.update(advance=len(batch))
    progress.close()

On a terminal (the stream's ``isatty()``) one line is redrawn with ``\\r`` at most every
``TTY_INTERVAL_S``: count / total, percent and a bar when the total is known, the rate per
second, the elapsed time and the ETA (``h:mm:ss``), then the caller's extra fields
(``removed 12``). Anywhere else (a log file, a pipe, a job's output) the same text is printed
as a plain line every ``interval_s`` (default 30 s, or ``$ENGINE_PROGRESS_INTERVAL_S``), so a
log neither floods nor stays silent; `close` prints the final line either way.

The rate and ETA use the average since the start (the work of these tools is uniform enough
that a moving average only adds noise). Callers pass ``enabled=rank == 0`` in distributed
runs: a disabled `Progress` does nothing. This module imports nothing from the engine.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

INTERVAL_ENV = "ENGINE_PROGRESS_INTERVAL_S"
"""Environment variable: seconds between log lines when the stream is not a terminal."""
DEFAULT_INTERVAL_S = 30.0
TTY_INTERVAL_S = 0.1
"""Seconds between redraws on a terminal (redrawing more often only costs time)."""
_BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (hours unbounded), rounded down to the second."""
    whole = max(int(seconds), 0)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def format_count(value: float) -> str:
    """A count with thousands separators; one decimal below 100 when it is fractional (MB)."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def format_rate(per_second: float) -> str:
    """A rate with three significant digits at most below 100, thousands separators above."""
    if per_second >= 100:
        return f"{per_second:,.0f}"
    if per_second >= 10:
        return f"{per_second:.1f}"
    return f"{per_second:.2f}"


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    """``$ENGINE_PROGRESS_INTERVAL_S`` as seconds (> 0), else ``default``."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"${INTERVAL_ENV}={raw!r}: expected a number of seconds > 0")
    return value


class Progress:
    """Counts work done and shows it (see the module docstring).

    Args:
        total: the amount of work when known (in the counted unit, before ``scale``), which
            gives the bar, the percentage and the ETA; None shows counts and rates only.
        unit: what is counted, as shown (``windows``, ``docs``, ``MB``).
        label: a prefix naming the work (``perplexity``, ``convert``).
        enabled: False makes every call a no-op (ranks other than 0).
        interval_s: seconds between log lines off a terminal (default
            ``$ENGINE_PROGRESS_INTERVAL_S`` or 30).
        stream: where to write (default ``sys.stderr``).
        scale: the count is divided by it for display (``2**20`` counts bytes, shows MB).
        clock: seconds, monotonic (``time.monotonic``; a test may pass its own).
    """

    def __init__(
        self,
        total: float | None = None,
        unit: str = "it",
        *,
        label: str = "",
        enabled: bool = True,
        interval_s: float | None = None,
        stream: TextIO | None = None,
        scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.set_total(total)
        self.unit, self.label, self.enabled = unit, label, enabled
        self.scale, self.clock = scale, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and _isatty(self.stream)
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"Progress interval_s must be > 0, got {interval_s}")
        self.interval_s = TTY_INTERVAL_S if self.tty else (interval_s or interval_from_env())
        self.done = 0.0
        self.counters: dict[str, float] = {}
        self.fields: dict[str, str] = {}
        self.start = self.last = clock()
        self.closed = False
        self._width = 0  # of the last line drawn on a terminal, to blank what it leaves
        self._lines = 0  # shown so far
        self._changed = False  # recorded since the last line shown

    def set_total(self, total: float | None) -> None:
        """The amount of work, once known (e.g. after the inputs are read)."""
        if total is not None and total < 0:
            raise ValueError(f"Progress total must be >= 0, got {total}")
        self.total = total

    def update(
        self,
        done: float | None = None,
        *,
        advance: float = 0,
        counters: Mapping[str, float] | None = None,
        fields: Mapping[str, str] | None = None,
        force: bool = False,
    ) -> None:
        """Record progress and show it if the interval has passed (or ``force``).

        Args:
            done: the amount done so far (absolute), or None to keep it.
            advance: added to the amount done (after ``done``).
            counters: other cumulative amounts shown as rates (``{"MB": 12.5}`` shows
                ``MB/s``), replacing earlier values of the same names.
            fields: extra ``name value`` fields (``{"removed": "12 (1.0%)"}``), likewise.
            force: show now whatever the interval.
        """
        if not self.enabled or self.closed:
            return
        self._record(done, advance, counters, fields)
        now = self.clock()
        if force or now - self.last >= self.interval_s:
            self.last = now
            self._show(self.line(now))

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The progress text at ``now`` (default: the clock's time)."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 0.0)
        done = self.done / self.scale
        parts = []
        if self.total is not None:
            total = self.total / self.scale
            fraction = min(self.done / self.total, 1.0) if self.total else 1.0
            filled = int(fraction * _BAR_WIDTH)
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            parts.append(
                f"[{bar}] {fraction:6.1%} {format_count(done)}/{format_count(total)} {self.unit}"
            )
        else:
            parts.append(f"{format_count(done)} {self.unit}")
        rates = {self.unit: done, **self.counters}
        if elapsed > 0:
            parts += [f"{format_rate(v / elapsed)} {name}/s" for name, v in rates.items()]
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total is not None and self.done < self.total and not final:
            parts.append(f"ETA {self._eta(elapsed)}")
        parts += [f"{name} {value}" for name, value in self.fields.items()]
        text = " | ".join(parts)
        return f"{self.label}: {text}" if self.label else text

    def _eta(self, elapsed: float) -> str:
        assert self.total is not None
        left = self.total - self.done
        if self.done <= 0 or elapsed <= 0:
            return "?"
        return format_duration(left * elapsed / self.done)

    def close(
        self,
        done: float | None = None,
        *,
        advance: float = 0,
        counters: Mapping[str, float] | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        """Record the last progress (as `update`) and show the final line, without the ETA;
        then end the terminal's line. Later calls do nothing."""
        if not self.enabled or self.closed:
            return
        self._record(done, advance, counters, fields)
        # A log whose last line already shows the end needs no second one.
        if self.tty or self._changed or not self._lines:
            self._show(self.line(final=True))
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True

    def clear(self) -> None:
        """Blank the terminal's progress line, so other output can be printed on it (it is
        drawn again at the next update); nothing off a terminal."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def _record(
        self,
        done: float | None,
        advance: float,
        counters: Mapping[str, float] | None,
        fields: Mapping[str, str] | None,
    ) -> None:
        before = (self.done, dict(self.counters), dict(self.fields))
        if done is not None:
            self.done = float(done)
        self.done += advance
        self.counters.update(counters or {})
        self.fields.update(fields or {})
        self._changed |= before != (self.done, self.counters, self.fields)

    def _show(self, text: str) -> None:
        if self.tty:
            # Spaces blank the rest of a longer previous line (no terminal escape needed).
            self.stream.write("\r" + text + " " * max(self._width - len(text), 0))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._lines += 1
        self._changed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no method, or a closed file
        return False
