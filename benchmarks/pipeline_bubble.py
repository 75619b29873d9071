"""Measured pipeline bubble of 1F1B and interleaved 1F1B against the theory.

Starts p gloo ranks on this machine, each a sleep-based stage of equal cost (so the CPU count
does not matter), runs one step of each schedule and prints every rank's compute time,
communication wait and peak in-flight microbatches, then the measured bubble next to
``(p-1)/(m+p-1)`` and ``(p-1)/(v·m+p-1)``. The last line is
``bubble_1f1b=X.XXX bubble_interleaved=X.XXX`` (measured).

    python benchmarks/pipeline_bubble.py [--pipeline-model-parallel-size 4 \\
        --num-microbatches 8 --virtual-pipeline-model-parallel-size 2 \\
        --forward-ms 40 --backward-ms 80 --png-prefix /tmp/bubble]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp

from engine import parallel_state
from engine.pipeline_parallel.bubble import run_sleep_schedule
from engine.pipeline_parallel.timeline import (
    ScheduleRecorder,
    format_report,
    measured_bubble,
    plot_timeline,
)


def _rank_main(rank: int, args: argparse.Namespace, init_file: str, queue) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    p = args.pipeline_model_parallel_size
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=p)
    results = {}
    for name, vpp in (("1f1b", None), ("interleaved", args.virtual_pipeline_model_parallel_size)):
        parallel_state.initialize_model_parallel(1, p, vpp)
        records = run_sleep_schedule(
            args.num_microbatches, args.forward_ms / 1e3, args.backward_ms / 1e3
        )
        parallel_state.destroy_model_parallel()
        results[name] = [r.to_dict() for r in records]
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=8)
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=2)
    parser.add_argument("--forward-ms", type=float, default=40.0)
    parser.add_argument("--backward-ms", type=float, default=80.0)
    parser.add_argument("--png-prefix", help="also draw {prefix}_1f1b.png and _interleaved.png")
    args = parser.parse_args()

    fd, init_file = tempfile.mkstemp(prefix="pipeline_bubble_")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank_main, args=(args, init_file, queue),
                       nprocs=args.pipeline_model_parallel_size, start_method="spawn")  # fmt: skip
    results = queue.get()
    bubbles = {}
    for name, dicts in results.items():
        records = [ScheduleRecorder.from_dict(d) for d in dicts]
        print(f"== {name}")
        print(format_report(records))
        bubbles[name] = measured_bubble(records)
        if args.png_prefix:
            plot_timeline(records, f"{args.png_prefix}_{name}.png", title=f"{name} schedule")
    print(f"bubble_1f1b={bubbles['1f1b']:.3f} bubble_interleaved={bubbles['interleaved']:.3f}")


if __name__ == "__main__":
    main()
