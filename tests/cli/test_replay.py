"""`llava-serve replay`: flagged conversations from the feedback stream, re-run through the controller's HTTP API
against a scripted stand-in worker, reported side by side."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from broker.app import create_app
from cli.main import build_parser
from cli.replay import ReplaySelection, parse_time, run_replay, run_replay_command, select_entries
from contract import keys
from contract.client import ControllerClient
from contract.feedback_messages import FeedbackType
from contract.messages import JobRequest
from infra.embedded_redis import free_port
from tests.broker.scripted_worker import FAST, ScriptedWorker, png_b64, settings_for

TARGET = "tiny-llava-v2"


@pytest.fixture
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(redis_url), timings=FAST, run_sweeper=False)) as test_client:
        yield test_client


def post_feedback(client: TestClient, kind: str, question: str, answer: str, model: str = "tiny-llava") -> str:
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64()}"}},
        {"type": "text", "text": question},
    ]
    body = {
        "type": kind,
        "model": model,
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
        "reason": f"{kind} | because",
        "params": {"temperature": 0.7, "max_new_tokens": 32},
    }
    response = client.post("/api/v1/feedback", json=body)
    assert response.status_code == 200, response.text
    return response.json()["entry_id"]


def answer_by_question(worker: ScriptedWorker, count: int) -> list[JobRequest]:
    """Serve `count` jobs, each answered from its question, so the same request gets the same reply."""
    served = []
    for _ in range(count):
        job = worker.claim()
        worker.start(job)
        question = job.messages[-1].content[-1].text  # type: ignore[index, union-attr]
        worker.tokens(job, ["new:", f" {question}"])
        worker.finish(job, f"new: {question}")
        served.append(job)
    return served


@pytest.fixture
def feedback(client: TestClient) -> list[str]:
    return [
        post_feedback(client, "flag", "what colour?", "blue"),
        post_feedback(client, "upvote", "how many?", "three"),
        post_feedback(client, "flag", "which shape?", "a circle\nmaybe"),
        post_feedback(client, "downvote", "where?", "nowhere", model="other-model"),
    ]


def test_flagged_conversations_are_replayed_side_by_side(
    client: TestClient, redis_client: redis.Redis, feedback: list[str], tmp_path: Path
) -> None:
    worker = ScriptedWorker(redis_client, model=TARGET).register()
    script = worker.in_thread(lambda w: answer_by_question(w, 2))
    controller = ControllerClient(http=client)
    report = run_replay(redis_client, controller, ReplaySelection(), TARGET, tmp_path, progress=False)
    jobs = script.result()

    assert [r.entry_id for r in report.rows] == [feedback[0], feedback[2]]
    first = report.rows[0]
    assert (first.original, first.replay, first.model, first.original_model) == (
        "blue",
        "new: what colour?",
        TARGET,
        "tiny-llava",
    )
    assert first.prompt == "[image] what colour?" and first.finish_reason == "eos" and first.error is None
    # Greedy by default, the judged reply left out, the image sent again.
    assert all(j.params.temperature == 0.0 and j.params.max_new_tokens == 32 for j in jobs)
    assert [m.role for m in jobs[0].messages] == ["user"] and len(jobs[0].images) == 1

    rows = [json.loads(line) for line in report.jsonl_path.read_text().splitlines()]
    assert [r["replay"] for r in rows] == ["new: what colour?", "new: which shape?"]
    assert "job_id" not in rows[0]
    table = report.table_path.read_text()
    assert report.table_path.name == "replay.md"
    assert "| flag \\| because |" in table and "a circle<br>maybe" in table

    stream = redis_client.xrange(keys.replays())
    assert len(stream) == 2
    assert json.loads(stream[0][1][b"row"])["job_id"] == jobs[0].job_id
    assert stream[0][1][b"run_id"].decode() == report.run_id


def test_the_same_selection_gives_the_same_report(
    client: TestClient, redis_client: redis.Redis, feedback: list[str], tmp_path: Path
) -> None:
    worker = ScriptedWorker(redis_client, model=TARGET).register()
    selection = ReplaySelection(types={FeedbackType.flag, FeedbackType.upvote, FeedbackType.downvote})
    outputs = []
    for run in ("a", "b"):
        script = worker.in_thread(lambda w: answer_by_question(w, 4))
        controller = ControllerClient(http=client)
        report = run_replay(redis_client, controller, selection, TARGET, tmp_path / run, fmt="html", progress=False)
        script.result()
        outputs.append((report.jsonl_path.read_bytes(), report.table_path.read_bytes()))
    assert outputs[0] == outputs[1]
    assert outputs[0][1].startswith(b"<!doctype html>") and b"a circle<br>maybe" in outputs[0][1]
    assert len(redis_client.xrange(keys.replays())) == 8


def test_selection_filters(client: TestClient, redis_client: redis.Redis, feedback: list[str]) -> None:
    def ids(**selection) -> list[str]:
        return [e.entry_id for e in select_entries(redis_client, ReplaySelection(**selection))]

    everything = {FeedbackType.flag, FeedbackType.upvote, FeedbackType.downvote}
    assert ids() == [feedback[0], feedback[2]]
    assert ids(types=everything) == feedback
    assert ids(types=everything, models={"other-model"}) == [feedback[3]]
    assert ids(types=everything, count=2) == feedback[:2]
    second = int(feedback[1].split("-")[0]) / 1000
    assert ids(types=everything, since=second) == [e for e in feedback if e.split("-")[0] >= feedback[1].split("-")[0]]
    assert ids(types=everything, until=second - 3600) == []


def test_unserved_model_is_reported_as_an_error_row(
    client: TestClient, redis_client: redis.Redis, feedback: list[str], tmp_path: Path
) -> None:
    controller = ControllerClient(http=client)
    report = run_replay(redis_client, controller, ReplaySelection(count=1), "no-such-model", tmp_path, progress=False)
    assert report.rows[0].error is not None and report.rows[0].error.startswith("model_not_found:")
    assert "**[model_not_found:" in report.table_path.read_text()


def test_command_line(client: TestClient, redis_client, redis_url: str, feedback: list[str], tmp_path: Path) -> None:
    worker = ScriptedWorker(redis_client, model=TARGET).register()
    args = build_parser().parse_args(
        ["replay", "--model", TARGET, "--type", "flag", "--include-votes", "--from-model", "tiny-llava",
         "--since", "2020-01-01T00:00:00", "--count", "2", "--out", str(tmp_path), "--redis-url", redis_url,
         "--no-progress"]
    )  # fmt: skip
    script = worker.in_thread(lambda w: answer_by_question(w, 2))
    assert run_replay_command(args, http=client) == 0
    script.result()
    rows = (tmp_path / "replay.jsonl").read_text().splitlines()
    assert [json.loads(r)["entry_id"] for r in rows] == feedback[:2]


def test_an_unreachable_controller_stops_the_run(
    client: TestClient, redis_url: str, feedback: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = build_parser().parse_args(
        ["replay", "--model", TARGET, "--out", str(tmp_path), "--redis-url", redis_url, "--controller-url", url,
         "--no-progress"]
    )  # fmt: skip
    assert run_replay_command(args) == 2
    assert f"cannot reach the controller at {url}" in capsys.readouterr().err
    assert not (tmp_path / "replay.jsonl").exists()


def test_parse_time() -> None:
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("2023-11-14T22:13:20") == 1700000000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1700000000.0
    assert abs(parse_time(str(time.time())) - time.time()) < 60
