"""A short `python -m bench.chaos`: a few worker kills (SIGKILL and SIGSTOP), a Redis restart and a short outage, a
controller killed among two, with streams in flight on the scripted engine (a deterministic fake engine for fault
tests, not a model). Every request ends done or with an error; none is lost or hangs; nothing is left behind. Then
its partition run, short, where network namespaces can be made, and the bookkeeping both runs count with."""

from __future__ import annotations

import pytest

from bench.chaos import run_chaos
from bench.chaos_partition import PartitionConfig, after_give_away, run_partition
from bench.chaos_requests import RequestRecord, count_outcomes
from bench.chaos_system import ChaosConfig
from cli.netns import unavailable_reason
from contract.messages import DoneEvent, ErrorEvent, FinishReason, TokenEvent

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


@pytest.mark.slow
def test_a_worker_cut_from_redis_loses_only_its_own_streams_and_comes_back() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    report = run_partition(PartitionConfig(in_flight=6, partition_s=8.0, after_heal_s=3.0, streaming_at_cut=1))
    summary = f"{report}"
    assert report.cut_streaming > 0, summary
    assert report.errors == {"worker_lost": report.cut_streaming}, summary
    assert report.done + report.cut_streaming == report.requests, summary
    assert report.lost == 0 and report.hung == 0, report.problems
    assert report.cut_streams_not_worker_lost == 0 and report.unstarted_not_served == 0, report.problems
    assert report.false_sweeps == 0 and report.events_after_give_away == 0, report.problems
    assert report.reregistered_after_heal_s is not None, summary
    assert report.leftover == [] and report.problems == [], summary


def _token(seq: int) -> tuple[float, TokenEvent]:
    return (0.0, TokenEvent(job_id="j", text=f"t{seq} ", seq=seq))


DONE = (0.0, DoneEvent(job_id="j", finish_reason=FinishReason.length))
LOST = (0.0, ErrorEvent(job_id="j", code="worker_lost", message="w3 stopped responding", status_code=502))


def test_messages_after_a_job_was_given_away_are_counted() -> None:
    # a stream the cut worker held: the sweeper's worker_lost ends it; anything after is the cut worker's
    assert after_give_away([_token(1), _token(2), LOST], streaming=True) == 0
    assert after_give_away([_token(1), LOST, _token(2), DONE], streaming=True) == 2
    # a job it had not started: another worker serves it whole; a seq seen twice or anything after done is not it
    assert after_give_away([_token(1), _token(2), DONE], streaming=False) == 0
    assert after_give_away([_token(1), _token(1), _token(2), DONE], streaming=False) == 1
    assert after_give_away([_token(1), DONE, _token(2)], streaming=False) == 1


def test_outcomes_are_counted_by_kind_and_code() -> None:
    records = [RequestRecord(k, 0, "start", 16, 0.0) for k in range(6)]
    kinds = ["done", "done", "error:worker_lost", "error:no_worker", "lost", "hung"]
    for record, outcome in zip(records, kinds, strict=True):
        record.outcome = outcome
    records[4].problem = "the stream ended after 3 events with no final one"
    outcomes = count_outcomes(records)
    assert (outcomes.requests, outcomes.done, outcomes.lost, outcomes.hung, outcomes.cut) == (6, 2, 1, 1, 0)
    assert outcomes.errors == {"no_worker": 1, "worker_lost": 1}
    assert outcomes.problems == [
        "request 4 (start, job None): lost: the stream ended after 3 events with no final one",
        "request 5 (start, job None): hung: None",
    ]
