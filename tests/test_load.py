"""Hundreds of concurrent SSE streams through one controller process, as real processes on real Redis.

The workers run the scripted engine (workers/scripted.py), a deterministic fake engine for load tests of the broker,
not a model. The stream checks are bench.load's, the same that `python -m bench.load` runs on a thousand streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.load import open_streams, start_scripted_system, stop_processes
from bench.load_checks import check_stream, leftover_jobs
from contract.messages import DoneEvent, TokenEvent, Usage
from infra.redis import connect

pytestmark = pytest.mark.pipeline

STREAMS = 300
TOKENS = 16
WORKERS = 2
MAX_BATCH = 160  # 2 x 160 slots: every stream runs at once, none waits for a slot


@pytest.fixture
def system(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """One controller and two scripted workers on an emptied database; the controller's URL."""
    connect(redis_url).flushdb()
    procs, url = start_scripted_system(redis_url, tmp_path, workers=WORKERS, max_batch=MAX_BATCH, max_queue=STREAMS)
    try:
        yield url
    finally:
        stop_processes(procs)


def test_every_one_of_hundreds_of_concurrent_streams_arrives_whole(system: str, redis_url: str) -> None:
    run = open_streams(system, STREAMS, TOKENS, timeout=90)

    problems = [f"stream {r.index} (job {r.job_id}): {r.problem}" for r in run.failures]
    assert not problems, f"{len(problems)} of {STREAMS} streams failed:\n" + "\n".join(problems[:20])
    assert sorted(r.index for r in run.results) == list(range(STREAMS))
    job_ids = {r.job_id for r in run.results}
    assert len(job_ids) == STREAMS and None not in job_ids
    # nothing queued, started, failed or cancelled, no job table entries or cancel flags: every job finished
    assert leftover_jobs(connect(redis_url), sorted(job_ids)) == []


def test_the_stream_check_catches_a_gap_a_short_text_and_an_error() -> None:
    text = "Request 0: what"
    words = text.split()
    tokens = [TokenEvent(job_id="j", text=(" " if k else "") + w, seq=k + 1) for k, w in enumerate(words)]
    done = DoneEvent(job_id="j", finish_reason="length", text=text, usage={"completion_tokens": 3})
    whole = [(0.0, event) for event in [*tokens, done]]
    assert check_stream(0, 3, whole, "j") is None

    gap = [whole[0], whole[2], whole[3]]
    assert "seq" in check_stream(0, 3, gap, "j")
    short = [*whole[:3], (0.0, done.model_copy(update={"text": "Request 0:"}))]
    assert "joined" in check_stream(0, 3, short, "j")
    assert "scripted reply" in check_stream(1, 3, whole, "j")  # another request's text
    no_usage = done.model_copy(update={"usage": Usage()})
    assert "completion tokens" in check_stream(0, 3, [*whole[:3], (0.0, no_usage)], "j")
    assert "more than one job" in check_stream(0, 3, whole, "other")
    assert "exactly one done" in check_stream(0, 3, whole[:3], "j")
