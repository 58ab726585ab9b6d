"""The UI's request and streaming logic (the handlers behind the buttons) against the real controller."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import redis
from PIL import Image

from broker import jobs, keys
from broker.feedback import feedback_generate_request, feedback_images, read_feedback
from broker.feedback_messages import FeedbackType
from broker.messages import JobRequest
from frontend.client import ControllerClient, ControllerError
from frontend.conversation import Conversation
from frontend.handlers import ChatHandlers, describe_error
from infra.embedded_redis import free_port
from infra.settings import WebSettings
from tests.frontend.conftest import MODEL


class RecordingClient(ControllerClient):
    """The real client, keeping every generate request it sent."""

    def __init__(self, url: str):
        super().__init__(url)
        self.sent = []

    def generate(self, request):
        self.sent.append(request)
        return super().generate(request)


def session(name: str = "s1"):
    return SimpleNamespace(session_hash=name, query_params={})


def chat(handlers: ChatHandlers, conv: Conversation, text: str, files=(), model=MODEL, max_tokens=6, name="s1"):
    """Send a message as the page does; returns every (state, chatbot, *buttons) the reply yielded."""
    out = handlers.add_message(conv, {"text": text, "files": list(files)}, "Pad")
    return list(handlers.generate(out[0], model, 0.2, 0.7, max_tokens, session(name)))


def picture(tmp_path, name="p.png", colour=(10, 200, 10)):
    path = tmp_path / name
    Image.new("RGB", (64, 32), colour).save(path)
    return str(path)


def test_multi_turn_chat_keeps_its_images(controller_url, scripted_worker, tmp_path):
    client = RecordingClient(controller_url)
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), client)
    conv = Conversation()
    updates = chat(handlers, conv, "describe this picture", [picture(tmp_path)])
    assert updates[-1][1][-1] == {
        "role": "assistant",
        "content": "describe this picture describe this picture\n\n_(cut at the max output tokens limit)_",
    }
    assert any(u[1][-1]["content"].endswith("▌") for u in updates[:-1])  # it streamed
    chat(handlers, conv, "and this one", [picture(tmp_path, "q.png", (200, 0, 0))])
    second = client.sent[-1]
    assert [m.role for m in second.messages] == ["user", "assistant", "user"]
    assert sum(p.type == "image_url" for m in second.messages if m.role == "user" for p in m.content) == 2
    assert second.temperature == 0.2 and second.top_p == 0.7 and second.max_new_tokens == 6
    assert second.seed is not None
    assert [t.job_id is not None for t in conv.turns if t.role == "assistant"] == [True, True]
    upvote, downvote, flag, regenerate, clear, stop = updates[-1][2:]
    assert upvote["interactive"] and flag["interactive"] and regenerate["interactive"] and not stop["interactive"]


def test_regenerate_asks_again(controller_url, scripted_worker):
    client = RecordingClient(controller_url)
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), client)
    conv = Conversation()
    chat(handlers, conv, "one two")
    state = handlers.regenerate(conv)[0]
    final = list(handlers.generate(state, MODEL, 0.2, 0.7, 3, session()))[-1]
    assert final[1] == [
        {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "one two one\n\n_(cut at the max output tokens limit)_"},
    ]
    assert [m.role for m in client.sent[-1].messages] == ["user"]


def test_queue_position_is_shown_and_stop_cancels_the_job(controller_url, idle_worker, redis_client):
    jobs.enqueue(redis_client, JobRequest(job_id="ahead", model=idle_worker), max_queue=10, result_ttl=60)
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), ControllerClient(controller_url))
    conv = Conversation()
    state = handlers.add_message(conv, {"text": "hello", "files": []}, "Default")[0]
    stream = handlers.generate(state, idle_worker, 0.2, 0.7, 16, session("waiting"))
    shown = [next(stream)[1][-1]["content"] for _ in range(2)]
    assert shown[-1] == "Waiting in queue: position 2"
    threading.Thread(target=handlers.stop, args=(session("waiting"),)).start()
    final = list(stream)[-1]
    assert final[1][-1]["content"] == "_(stopped)_"
    job_id = conv.last_reply.job_id
    assert jobs.queue_position(redis_client, idle_worker, job_id) is None
    assert jobs.view(redis_client, job_id).status == "canceled"


def test_errors_are_specific(controller_url, scripted_worker):
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), ControllerClient(controller_url))
    reply = chat(handlers, Conversation(), "hi", model="no-such-model")[-1][1][-1]["content"]
    assert reply.startswith("⚠️ The controller does not know model `no-such-model`")
    assert describe_error(ControllerError("queue_full", "full", retry_after=7), "m") == (
        "⚠️ The queue for `m` is full: try again in 7 s."
    )
    assert "Image rejected: image at messages" in describe_error(
        ControllerError("invalid_image", "image at messages[0] cannot be decoded"), "m"
    )
    assert "Regenerate" in describe_error(ControllerError("worker_lost", "worker w1 died"), "m")
    assert "too long" in describe_error(ControllerError("context_length_exceeded", "2000 > 1024"), "m")
    assert "No worker is serving `m`" in describe_error(ControllerError("no_worker", "none"), "m")


def test_the_page_loads_without_a_controller():
    url = f"http://127.0.0.1:{free_port()}"
    handlers = ChatHandlers(WebSettings(controller_url=url, model_list_mode="once"), ControllerClient(url))
    state, dropdown, status = handlers.load(session())
    assert dropdown["choices"] == [] and dropdown["value"] is None
    assert status["visible"] and "controller is unreachable" in status["value"] and "Reload the page" in status["value"]
    conv = handlers.add_message(state, {"text": "hi", "files": []}, "Default")[0]
    reply = list(handlers.generate(conv, "m", 0.2, 0.7, 16, session()))[-1][1][-1]["content"]
    assert reply.startswith("⚠️ The controller is unreachable")


def test_model_from_the_url_is_selected(controller_url, scripted_worker, idle_worker):
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), ControllerClient(controller_url))
    request = SimpleNamespace(session_hash="s", query_params={"model": MODEL})
    _, dropdown, status = handlers.load(request)
    assert dropdown["value"] == MODEL and not status["visible"]
    assert sorted(v for _, v in dropdown["choices"]) == sorted([MODEL, idle_worker])
    request.query_params = {"model": "nope"}
    assert "`nope`" in handlers.load(request)[2]["value"]


def test_votes_and_flags_reach_the_feedback_stream(controller_url, scripted_worker, tmp_path, redis_url):
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), RecordingClient(controller_url))
    conv = Conversation()
    chat(handlers, conv, "what shape is it", [picture(tmp_path)])
    status, up, down, flag, _ = handlers.feedback(FeedbackType.upvote, conv, "ignored for votes")
    assert status["value"] == "Thanks, your upvote was recorded." and up["interactive"] is False
    status, *_ = handlers.feedback(FeedbackType.flag, conv, "  made up an answer ")
    assert status["value"].startswith("Flag recorded")
    client = redis.Redis.from_url(redis_url)
    upvote, flagged = read_feedback(client)
    assert (upvote.type, upvote.reason, flagged.type, flagged.reason) == (
        FeedbackType.upvote,
        "",
        FeedbackType.flag,
        "made up an answer",
    )
    assert flagged.model == MODEL and flagged.job_ids == [conv.last_reply.job_id]
    assert flagged.params.seed == handlers.client.sent[-1].seed
    (digest,) = flagged.images
    assert client.ttl(keys.image(digest)) == -1  # kept for as long as the entry
    assert feedback_images(client, flagged)[digest] == conv.turns[0].images[0].png
    replayed = feedback_generate_request(client, flagged)
    assert replayed == handlers.client.sent[-1]
    assert time.time() - flagged.received_at < 60
