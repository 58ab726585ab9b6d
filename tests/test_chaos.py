"""A short `python -m bench.chaos`: a few worker kills (SIGKILL and SIGSTOP), a Redis restart and a short outage, a
controller killed among two, with streams in flight on the scripted engine (a deterministic fake engine for fault
tests, not a model). Every request ends done or with an error; none is lost or hangs; nothing is left behind."""

from __future__ import annotations

import pytest

from bench.chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.timeout(600)


def test_no_request_is_lost_or_hangs_under_faults() -> None:
    config = ChaosConfig(workers=3, in_flight=6, kills=6, kill_interval_s=1.5, stop_hold_s=6.0, restarts=1,
                         outages_s=(2.0,), cpu_hogs=1, stream_timeout_s=90.0, seed=1)  # fmt: skip
    report = run_chaos(config)
    summary = f"{report}"
    assert report.requests > 20, summary
    assert report.worker_kills == 6, summary
    assert report.lost == 0 and report.hung == 0, report.problems
    assert report.false_worker_lost == 0, summary
    assert report.false_outage_errors == 0, summary
    assert report.orphan_jobs == 0, summary
    assert report.leftover == [], report.leftover
    assert report.done + sum(report.errors.values()) + report.cut == report.requests, summary
