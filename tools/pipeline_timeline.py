"""Print the measured pipeline bubble next to the theory, and draw the schedule as a PNG.

Reads the per-rank records a schedule wrote when given a recorder, one JSON file per
pipeline rank (``ScheduleRecorder.save``)::

    recorder = ScheduleRecorder(rank=pp_rank)
    forward_backward_func(..., recorder=recorder)
    recorder.save(f"timeline/rank{pp_rank}.json")

    python tools/pipeline_timeline.py timeline/ --png timeline.png

Prints, per rank, the seconds spent computing, the seconds spent in point-to-point calls
(waiting on neighbours) and the peak number of microbatches in flight, then the measured
bubble and ``(p-1)/(v·m+p-1)``. The PNG needs matplotlib.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.pipeline_parallel.timeline import ScheduleRecorder, format_report, plot_timeline


def load_records(paths: list[str]) -> list[ScheduleRecorder]:
    """Records from JSON files and directories of them, ordered by rank."""
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(sorted(path.glob("*.json")) if path.is_dir() else [path])
    if not files:
        raise SystemExit(f"no record files (*.json) found in {paths}")
    return sorted((ScheduleRecorder.load(f) for f in files), key=lambda r: r.rank)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", help="rank JSON files or directories of them")
    parser.add_argument("--png", help="draw the timeline into this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    records = load_records(args.records)
    print(format_report(records))
    if args.png:
        try:
            plot_timeline(records, args.png)
        except ImportError as error:
            print(f"no PNG: {error}", file=sys.stderr)
        else:
            print(f"timeline written to {args.png}")


if __name__ == "__main__":
    main()
