"""The schedules' instrumentation on sleep-based, equal-cost stages (4 gloo ranks).

With p = 4 and m = 8 the measured 1F1B bubble must be within 0.03 of (p-1)/(m+p-1), the
interleaved schedule (v = 2) must measure lower, and the recorder's peak in-flight count on
rank r must be the 1F1B bound p - r. Stages sleep instead of computing, so the four ranks on
two cores measure the schedule; the remaining error is p2p latency and sleep overshoot,
which grow with the machine's load: a run outside the tolerance is repeated once.
"""

from __future__ import annotations

import importlib.util

import pytest

from engine import parallel_state
from engine.pipeline_parallel.bubble import run_sleep_schedule
from engine.pipeline_parallel.timeline import (
    ScheduleRecorder,
    measured_bubble,
    theoretical_bubble,
)
from tests.rank_pool import RankPool, module_pool
from tools import pipeline_timeline

P, M, V = 4, 8, 2
FORWARD_S, BACKWARD_S = 0.04, 0.08


pool = module_pool(P)


def sleep_run(vpp: int | None) -> list[dict]:
    parallel_state.initialize_model_parallel(1, P, vpp)
    try:
        return [r.to_dict() for r in run_sleep_schedule(M, FORWARD_S, BACKWARD_S)]
    finally:
        parallel_state.destroy_model_parallel()


def _measure(pool: RankPool, vpp: int | None) -> list[ScheduleRecorder]:
    return [ScheduleRecorder.from_dict(d) for d in pool.run(sleep_run, vpp)[0]]


@pytest.fixture(scope="module")
def records(pool) -> dict[str, list[ScheduleRecorder]]:
    one_f_one_b = _measure(pool, None)
    if abs(measured_bubble(one_f_one_b) - theoretical_bubble(P, M)) >= 0.03:
        one_f_one_b = _measure(pool, None)  # once more: a loaded machine delays wake-ups
    return {"1f1b": one_f_one_b, "interleaved": _measure(pool, V)}


def test_1f1b_bubble_matches_theory(records):
    measured = measured_bubble(records["1f1b"])
    assert abs(measured - theoretical_bubble(P, M)) < 0.03, measured


def test_interleaving_lowers_the_bubble(records):
    interleaved = measured_bubble(records["interleaved"])
    assert interleaved < measured_bubble(records["1f1b"])
    assert interleaved >= theoretical_bubble(P, M, V) - 0.03


def test_peak_in_flight_follows_the_1f1b_bound(records):
    for recorder in records["1f1b"]:
        assert recorder.peak_in_flight == P - recorder.rank
        assert recorder.in_flight == 0
        assert recorder.comm_s() > 0
        spans = [s for s in recorder.spans if s.kind != "comm"]
        assert sorted((s.kind, s.microbatch) for s in spans) == sorted(
            (kind, mb) for kind in ("backward", "forward") for mb in range(M)
        )


def test_timeline_tool_prints_bubble_and_draws_png(records, tmp_path, capsys):
    for recorder in records["interleaved"]:
        recorder.save(tmp_path / f"rank{recorder.rank}.json")
    png = tmp_path / "timeline.png"
    pipeline_timeline.main([str(tmp_path), "--png", str(png)])
    out = capsys.readouterr().out
    assert f"p={P} m={M} v={V}" in out
    assert f"theory {theoretical_bubble(P, M, V):.3f}" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 1000
