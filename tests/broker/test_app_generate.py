"""`POST /api/v1/generate` end to end against real Redis, with a scripted stand-in for the worker."""

from __future__ import annotations

from fastapi.testclient import TestClient

from broker.app import create_app
from contract import jobs, keys
from contract.keys import rq_queue
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, png_b64, read_sse, settings_for


def stream(client: TestClient, body: dict) -> list[tuple[str, dict]]:
    with client.stream("POST", "/api/v1/generate", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(read_sse(response.iter_lines()))


def test_tokens_stream_in_order_then_done(client: TestClient, worker: ScriptedWorker) -> None:
    pieces = ["A", " red", " square", "."]
    script = worker.in_thread(lambda w: w.serve_one(pieces))
    events = stream(client, chat_body(images=[png_b64()], temperature=0.0, max_new_tokens=16))
    job = script.result()

    names = [name for name, _ in events]
    assert names[-1] == "done"
    tokens = [data for name, data in events if name == "token"]
    assert [t["text"] for t in tokens] == pieces
    assert [t["seq"] for t in tokens] == [1, 2, 3, 4]
    assert set(names) <= {"queued", "token", "done"}
    done = events[-1][1]
    assert done["job_id"] == job.job_id
    assert done["finish_reason"] == "eos"
    assert done["text"] == "A red square."
    assert done["usage"]["completion_tokens"] == len("A red square.")
    # The job the worker got carries the request as sent, with the image stored by digest.
    assert job.params.temperature == 0.0 and job.params.max_new_tokens == 16
    assert job.messages is not None and job.messages[0].content[0].type == "image"


def test_job_record_readable_after_the_stream(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["ok"]))
    events = stream(client, chat_body())
    job = script.result()
    view = client.get(f"/api/v1/jobs/{job.job_id}")
    assert view.status_code == 200
    body = view.json()
    assert body["status"] == "finished"
    assert body["outcome"]["text"] == "ok" == events[-1][1]["text"]
    assert body["outcome"]["finish_reason"] == "eos"


def test_images_stored_once_by_digest(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    image = png_b64(4, 4)
    script = worker.in_thread(lambda w: w.serve_one(["x"]))
    stream(client, chat_body(images=[image, image]))
    job = script.result()
    assert len(job.images) == 2 and job.images[0] == job.images[1]
    stored = redis_client.keys(keys.image("*"))
    assert stored == [keys.image(job.images[0]).encode()]
    assert 0 < redis_client.ttl(keys.image(job.images[0])) <= keys.IMAGE_TTL_S


def test_queued_position_is_sent_while_waiting(client: TestClient, worker: ScriptedWorker) -> None:
    def script(w: ScriptedWorker):
        import time

        time.sleep(0.4)  # let the stream report its position a few times
        return w.serve_one(["hi"])

    running = worker.in_thread(script)
    events = stream(client, chat_body())
    running.result()
    queued = [data for name, data in events if name == "queued"]
    assert len(queued) >= 2
    assert all(q["position"] == 0 for q in queued)
    assert events[-1][0] == "done"


def test_worker_error_is_relayed_as_final_error_event(client: TestClient, worker: ScriptedWorker) -> None:
    def script(w: ScriptedWorker):
        job = w.claim()
        w.start(job)
        w.fail(job, "context_length_exceeded", "prompt is 3000 tokens, the model's context is 2048")

    running = worker.in_thread(script)
    events = stream(client, chat_body())
    running.result()
    assert events[-1][0] == "error"
    assert events[-1][1]["code"] == "context_length_exceeded"
    assert "2048" in events[-1][1]["message"]


def test_lost_done_message_is_recovered_from_the_job_record(client: TestClient, worker: ScriptedWorker) -> None:
    def script(w: ScriptedWorker):
        job = w.claim()
        w.start(job)
        w.tokens(job, ["par"])
        w.finish(job, "partial text", publish=False)  # as if the done message was lost in a Redis blip

    running = worker.in_thread(script)
    events = stream(client, chat_body())
    running.result()
    assert events[-1][0] == "done"
    assert events[-1][1]["text"] == "partial text"


def test_queued_job_without_live_worker_ends_with_no_worker(
    client: TestClient, worker: ScriptedWorker, redis_client
) -> None:
    # The model is known (a worker served it), then the worker goes away while the job waits.
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        assert response.status_code == 200
        worker.unregister()
        events = list(read_sse(response.iter_lines()))
    assert events[-1][0] == "error"
    assert events[-1][1]["code"] == "no_worker"
    assert "tiny-llava" in events[-1][1]["message"]
    assert redis_client.llen(rq_queue("tiny-llava")) == 0
    view = jobs.view(redis_client, events[-1][1]["job_id"])
    assert view is not None and view.status == "canceled"


def test_disconnect_while_queued_removes_the_job(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        events = read_sse(response.iter_lines())  # kept: dropping the iterator would close the response
        first = next(events)
        assert first[0] == "queued"
        job_id = first[1]["job_id"]
        assert redis_client.llen(rq_queue("tiny-llava")) == 1
    # Leaving the block closes the connection before the end of the stream.
    assert redis_client.llen(rq_queue("tiny-llava")) == 0
    assert redis_client.exists(keys.cancel(job_id))
    assert jobs.view(redis_client, job_id).status == "canceled"


def test_disconnect_while_running_sets_the_cancel_flag(
    client: TestClient, worker: ScriptedWorker, redis_client
) -> None:
    running = worker.in_thread(lambda w: w.stream_then_hold(["first"]))
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        events = read_sse(response.iter_lines())
        for name, _ in events:
            if name == "token":
                break
        job = running.result()
        assert not jobs.is_cancel_requested(redis_client, job.job_id)
    assert jobs.is_cancel_requested(redis_client, job.job_id)
    assert jobs.view(redis_client, job.job_id).status == "started"  # the worker stops it, not the controller


def test_cancel_endpoint_removes_a_queued_job(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        lines = response.iter_lines()
        name, data = next(read_sse(lines))
        reply = client.post(f"/api/v1/jobs/{data['job_id']}/cancel")
        assert reply.status_code == 200
        assert reply.json()["removed_from_queue"] is True
        assert reply.json()["job"]["status"] == "canceled"
        rest = list(read_sse(lines))
    assert rest[-1][0] == "done"
    assert rest[-1][1]["finish_reason"] == "cancelled"


def test_models_workers_and_health(client: TestClient, worker: ScriptedWorker) -> None:
    models = client.get("/api/v1/models").json()["models"]
    every_mode = ["crop", "resize", "pad", "default"]
    assert models == [
        {"name": "tiny-llava", "workers": 1, "queue_depth": 0, "max_context": 2048, "image_modes": every_mode}
    ]
    workers = client.get("/api/v1/workers").json()["workers"]
    assert [w["worker_id"] for w in workers] == ["scripted-1"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_unknown_job_is_404(client: TestClient) -> None:
    for response in (client.get("/api/v1/jobs/nope"), client.post("/api/v1/jobs/nope/cancel")):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
        assert "nope" in response.json()["error"]["message"]


def test_a_model_lists_the_image_modes_all_its_workers_support(client: TestClient, redis_client) -> None:
    ScriptedWorker(redis_client, "shapes", "w1").register(image_modes=["resize", "default", "crop"])
    ScriptedWorker(redis_client, "shapes", "w2").register(image_modes=["default", "resize"])
    ScriptedWorker(redis_client, "other", "w3").register()  # lists none: every mode
    models = {m["name"]: m["image_modes"] for m in client.get("/api/v1/models").json()["models"]}
    assert models == {"shapes": ["resize", "default"], "other": ["crop", "resize", "pad", "default"]}


def test_info_says_whether_conversations_are_recorded(client: TestClient, redis_url: str) -> None:
    assert client.get("/api/v1/info").json() == {
        "conversation_log": False,
        "log_retention_days": None,
        "log_retention_entries": None,
        "feedback_retention_days": 365.0,
    }
    settings = settings_for(redis_url, log_conversations=True, log_retention_days=7)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as logging:
        info = logging.get("/api/v1/info").json()
    assert info["conversation_log"] is True and info["log_retention_days"] == 7
