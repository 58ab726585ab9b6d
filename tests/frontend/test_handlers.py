"""The UI's request and streaming logic (the handlers behind the buttons) against the real controller."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import gradio as gr
import pytest

from contract import jobs
from contract.client import ControllerClient, parse_event
from contract.errors import (
    ContextTooLong,
    ErrorCode,
    ImageInvalid,
    NoWorker,
    QueueFull,
    ReplyFlagged,
    WorkerLost,
    error_from_code,
)
from contract.messages import DoneEvent, FinishReason, JobRequest, QueuedEvent, TokenEvent
from frontend import texts
from frontend.conversation import LEFT_OUT, NO_IMAGE_HINT, Conversation
from frontend.handlers import ChatHandlers, describe_error, waiting_text
from infra.embedded_redis import free_port
from infra.settings import WebSettings
from tests.frontend.conftest import MODEL, RecordingClient, chat, picture, session, start_worker, text_of


def test_multi_turn_chat_keeps_its_images(controller_url, scripted_worker, tmp_path):
    client = RecordingClient(controller_url)
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), client)
    conv = Conversation()
    updates = chat(handlers, conv, "describe this picture", [picture(tmp_path)])
    assert updates[-1][1][-1] == {
        "role": "assistant",
        "content": "describe this picture describe this picture\n\n_(cut at the max output tokens limit)_",
    }
    assert any(text_of(u[1][-1]).endswith("▌") for u in updates[:-1])  # it streamed
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
        {"role": "assistant", "content": f"one two one\n\n_(cut at the max output tokens limit)_\n\n{NO_IMAGE_HINT}"},
    ]
    assert [m.role for m in client.sent[-1].messages] == ["user"]


def test_queue_position_is_shown_and_stop_cancels_the_job(controller_url, idle_worker, redis_client):
    jobs.enqueue(redis_client, JobRequest(job_id="ahead", model=idle_worker), max_queue=10, result_ttl=60)
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), ControllerClient(controller_url))
    conv = Conversation()
    state = handlers.add_message(conv, {"text": "hello", "files": []}, "default")[0]
    stream = handlers.generate(state, idle_worker, 0.2, 0.7, 16, session("waiting"))
    shown = [text_of(next(stream)[1][-1]) for _ in range(2)]
    assert shown[-1] == f"{waiting_text(1)}\n\n{NO_IMAGE_HINT}" and "1 request ahead of yours" in shown[-1]
    threading.Thread(target=handlers.stop, args=(session("waiting"),)).start()
    final = list(stream)[-1]
    # Nothing to send back to the model.
    assert text_of(final[1][-1]) == f"_(stopped)_\n\n{LEFT_OUT}\n\n{NO_IMAGE_HINT}"
    job_id = conv.last_reply.job_id
    assert jobs.queue_position(redis_client, idle_worker, job_id) is None
    assert jobs.view(redis_client, job_id).status == "canceled"


def test_errors_are_specific(controller_url, scripted_worker):
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), ControllerClient(controller_url))
    reply = text_of(chat(handlers, Conversation(), "hi", model="no-such-model")[-1][1][-1])
    assert reply.startswith("⚠️ The model `no-such-model` is not available any more. Pick another model")
    assert describe_error(QueueFull("full", retry_after=7), "m").startswith(
        "⚠️ The model `m` has too many requests right now. Try again in 7 s"
    )
    assert "An image could not be used: image at messages" in describe_error(
        ImageInvalid("image at messages[0] cannot be decoded"), "m"
    )
    assert "Regenerate" in describe_error(WorkerLost("worker w1 died"), "m")
    assert "too long" in describe_error(ContextTooLong("2000 > 1024"), "m")
    assert "`m` is not available right now" in describe_error(NoWorker("none"), "m")


def test_a_flagged_reply_is_explained_in_words() -> None:
    text = describe_error(ReplyFlagged("the reply was stopped by moderation: its text matches `forbidden`"), "m")
    assert text.startswith("⚠️ This reply was stopped because it went against the rules of this service.")
    assert "forbidden" not in text and "Regenerate" in text


# What the server says for the operator: a worker's id and host, and what to run.
OPERATOR_DETAIL = "worker vm-7f3a@gpu-host-2 stopped responding; start a worker with `llava-serve worker`"


@pytest.mark.parametrize(
    "code",
    [c for c in ErrorCode if c not in (ErrorCode.invalid_image, ErrorCode.image_too_large, ErrorCode.invalid_request)],
)
def test_error_texts_speak_to_the_user_without_operator_detail(code):
    text = describe_error(error_from_code(code, OPERATOR_DETAIL), "m")
    assert text.startswith("⚠️ ") and "vm-7f3a" not in text and "gpu-host" not in text
    assert "llava-serve" not in text and "Start a worker" not in text and "worker" not in text.lower()
    assert text.count("Regenerate") <= 1 and "lost" not in text  # said once; a partial reply stays on screen


def test_page_texts_speak_to_the_user_without_operator_detail():
    for text in (
        texts.SERVICE_DOWN,
        texts.NO_MODEL_YET,
        texts.STILL_WORKING,
        texts.waiting_text(0),
        texts.waiting_text(3),
    ):
        assert "worker" not in text.lower() and "llava-serve" not in text and "controller" not in text


def test_the_page_loads_without_a_controller():
    url = f"http://127.0.0.1:{free_port()}"
    handlers = ChatHandlers(WebSettings(controller_url=url, model_list_mode="once"), ControllerClient(url))
    state, dropdown, status = handlers.load(session())
    assert dropdown["choices"] == [] and dropdown["value"] is None
    assert status["visible"] and status["value"] == texts.SERVICE_DOWN
    conv = handlers.add_message(state, {"text": "hi", "files": []}, "default")[0]
    reply = text_of(list(handlers.generate(conv, "m", 0.2, 0.7, 16, session()))[-1][1][-1])
    assert reply.startswith("⚠️ The chat service is not reachable right now.")


def test_model_from_the_url_is_selected(controller_url, scripted_worker, idle_worker):
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), ControllerClient(controller_url))
    request = SimpleNamespace(session_hash="s", query_params={"model": MODEL})
    _, dropdown, status = handlers.load(request)
    assert dropdown["value"] == MODEL and not status["visible"]
    assert sorted(v for _, v in dropdown["choices"]) == sorted([MODEL, idle_worker])
    request.query_params = {"model": "nope"}
    assert "`nope`" in handlers.load(request)[2]["value"]


def test_a_failed_exchange_stays_on_screen_but_is_not_sent_again(controller_url, scripted_worker, tmp_path):
    client = RecordingClient(controller_url)
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), client)
    conv = Conversation()
    chat(handlers, conv, "what is this", [picture(tmp_path)])
    answer = conv.last_reply.text
    # The scripted worker (a stand-in, not a model) fails this job after two tokens, as a worker error would.
    failed = chat(handlers, conv, "[[device-error]] and this", [picture(tmp_path, "q.png", (200, 0, 0))])[-1]
    shown = text_of(failed[1][-1])
    assert "The model failed while writing this reply" in shown and shown.endswith(LEFT_OUT)
    assert conv.last_reply.failed and not failed[2]["interactive"] and failed[5]["interactive"]  # no vote; Regenerate
    final = chat(handlers, conv, "what colour is it")[-1]
    sent = client.sent[-1]
    # Had the failed exchange been sent, its marker would have failed this reply too.
    assert [m.role for m in sent.messages] == ["user", "assistant", "user"]
    assert [[p.type for p in m.content] if m.role == "user" else m.content for m in sent.messages] == [
        ["image_url", "text"],
        answer,
        ["text"],
    ]
    assert sent.messages[-1].content[0].text == "what colour is it"
    assert not conv.last_reply.failed and text_of(final[1][-1]).startswith("what is this")
    assert [m["role"] for m in final[1]] == [
        "user",
        "user",
        "assistant",
        "user",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_a_message_sent_while_a_reply_is_written_is_answered_next(controller_url, scripted_worker):
    client = RecordingClient(controller_url)
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), client)
    conv = handlers.add_message(Conversation(), {"text": "one", "files": []}, "default")[0]
    stream = handlers.generate(conv, MODEL, 0.2, 0.7, 4, session("busy"))
    next(stream)  # the reply has started
    taken = handlers.add_message(conv, {"text": "two", "files": []}, "default")
    assert [t.role for t in conv.turns] == ["user", "assistant", "user"] and taken[-1]["interactive"]  # Stop on
    # The Send chain runs generate again: the running call answers the message, this one only keeps Stop on.
    (follow,) = handlers.generate(conv, MODEL, 0.2, 0.7, 4, session("busy"))
    assert follow[-1]["interactive"] and not follow[-2]["interactive"]
    updates = list(stream)
    assert [t.role for t in conv.turns] == ["user", "assistant", "user", "assistant"] and not conv.replying
    assert [[m.role for m in r.messages] for r in client.sent] == [["user"], ["user", "assistant", "user"]]
    assert not updates[-1][-1]["interactive"] and updates[-1][5]["interactive"]
    # Between the two replies Stop stayed on: no moment looked finished.
    assert all(u[-1]["interactive"] for u in updates[:-1])


class GarbledClient(ControllerClient):
    """A client whose stream carries a malformed event (a controller bug), without any controller."""

    def generate(self, request, end_user=None):
        yield parse_event("queued", '{"type": "queued", "job_id": "j1", "position": "soon"}')


def test_an_unexpected_failure_ends_the_reply_with_its_cause():
    url = f"http://127.0.0.1:{free_port()}"
    handlers = ChatHandlers(WebSettings(controller_url=url), GarbledClient(url))
    conv = Conversation()
    final = chat(handlers, conv, "hi", model="m")[-1]
    assert text_of(final[1][-1]).startswith(texts.PAGE_FAILED)
    assert conv.last_reply.failed and not conv.replying and final[5]["interactive"]  # Regenerate is offered


def test_clear_while_a_reply_waits_stops_it_and_it_cannot_come_back(controller_url, idle_worker, redis_client):
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), ControllerClient(controller_url))
    conv = handlers.add_message(Conversation(), {"text": "hello", "files": []}, "default")[0]
    stream = handlers.generate(conv, idle_worker, 0.2, 0.7, 16, session("clearing"))
    while conv.last_reply is None or not conv.last_reply.job_id:
        next(stream)
    job_id = conv.last_reply.job_id
    cleared = handlers.clear(conv, session("clearing"))
    assert cleared[0] is conv and cleared[1]["value"] == [] and not conv.turns
    final = list(stream)[-1]
    assert final[0] is conv and final[1] == [] and not conv.turns
    assert jobs.view(redis_client, job_id).status == "canceled"


def test_a_file_that_is_not_an_image_is_refused_and_nothing_is_sent(controller_url, scripted_worker, tmp_path):
    client = RecordingClient(controller_url)
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), client)
    conv = Conversation()
    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture")
    sent = {"text": "what is this", "files": [picture(tmp_path), str(fake)]}
    with pytest.warns(UserWarning) as warned:
        refused = handlers.add_message(conv, sent, "pad")
    (message,) = [str(w.message) for w in warned]
    assert "holiday.png" in message and "not sent" in message
    assert str(tmp_path) not in message and "/" not in message  # no server path
    assert refused[2] == gr.update(value=sent) and not conv.turns  # back in the textbox; nothing to answer
    assert list(handlers.generate(conv, MODEL, 0.2, 0.7, 6, session()))[-1][1] == []
    assert client.sent == []


def test_a_question_without_any_image_says_so(controller_url, scripted_worker, tmp_path):
    handlers = ChatHandlers(WebSettings(controller_url=controller_url), ControllerClient(controller_url))
    conv = Conversation()
    shown = text_of(chat(handlers, conv, "what is this")[-1][1][-1])
    assert "No image is attached" in shown
    chat(handlers, conv, "and this", [picture(tmp_path)])
    assert "No image is attached" not in text_of(conv.chatbot_messages()[-1])


class SilentClient(ControllerClient):
    """A client whose stream says `queued` and then nothing at all (a frozen worker or network), without any
    controller; it records the jobs cancelled through the API."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.cancelled: list[str] = []
        self.released = threading.Event()

    def generate(self, request, end_user=None):
        yield QueuedEvent(job_id="j-silent", position=0)
        self.released.wait(30)

    def cancel(self, job_id: str, end_user=None):
        self.cancelled.append(job_id)
        return None


def test_stop_ends_a_silent_reply_at_once_and_cancels_its_job():
    url = f"http://127.0.0.1:{free_port()}"
    client = SilentClient(url)
    handlers = ChatHandlers(WebSettings(controller_url=url), client, still_working_after_s=0.05)
    conv = handlers.add_message(Conversation(), {"text": "hello", "files": []}, "default")[0]
    stream = handlers.generate(conv, "m", 0.2, 0.7, 16, session("silent"))
    # The reply waits visibly: more than a bare cursor.
    shown = ""
    while "Still working" not in shown:
        shown = text_of(next(stream)[1][-1])
    assert "Stop" in shown and conv.last_reply.job_id == "j-silent"
    handlers.stop(session("silent"))
    final = next(stream)  # nothing else arrives on the stream: the reply ends anyway
    client.released.set()
    assert text_of(final[1][-1]).startswith("_(stopped)_") and not conv.replying
    assert client.cancelled == ["j-silent"]
    assert not final[-1]["interactive"] and final[5]["interactive"]  # Stop off, Regenerate on


@pytest.mark.parametrize("mode", ["once", "reload"])
def test_the_model_list_recovers_when_a_worker_registers_after_the_page_opened(controller_url, redis_url, mode):
    handlers = ChatHandlers(
        WebSettings(controller_url=controller_url, model_list_mode=mode), ControllerClient(controller_url)
    )
    _, dropdown, status = handlers.load(session())
    assert dropdown["choices"] == [] and status["visible"] and "No model is available yet" in status["value"]
    worker = start_worker(redis_url)
    try:
        dropdown, status = handlers.refresh_models(None, status["value"])
    finally:
        worker.stop()
    assert dropdown["value"] == MODEL and [v for _, v in dropdown["choices"]] == [MODEL]
    assert not status["visible"]
    # A choice the user made stays; a vote's note in the status line is not touched.
    dropdown, status = handlers.refresh_models("other-model", "Thanks, your upvote was recorded.")
    assert dropdown["value"] == "other-model" and status == gr.update()


class SpacedClient(ControllerClient):
    """A client whose reply starts with a space, as SentencePiece tokens do, without any controller."""

    def generate(self, request, end_user=None):
        yield QueuedEvent(job_id="j-spaced", position=0)
        yield TokenEvent(job_id="j-spaced", text=" A", seq=1)
        yield TokenEvent(job_id="j-spaced", text=" red", seq=2)
        yield DoneEvent(job_id="j-spaced", text=" A red square", finish_reason=FinishReason.stop)


def test_replies_are_shown_and_stored_without_a_leading_space(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    handlers = ChatHandlers(WebSettings(controller_url=url), SpacedClient(url))
    conv = Conversation()
    updates = chat(handlers, conv, "what is it", [picture(tmp_path)], model="m")
    shown = [text_of(u[1][-1]) for u in updates]
    assert "A▌" in shown and "A red▌" in shown and shown[-1] == "A red square"
    assert conv.last_reply.text == "A red square"


def test_only_the_image_modes_a_model_supports_are_offered(controller_url, redis_url):
    url = controller_url
    handlers = ChatHandlers(WebSettings(controller_url=url), ControllerClient(url))
    every = [("Crop", "crop"), ("Resize", "resize"), ("Pad", "pad"), ("Default", "default")]
    assert handlers.image_modes(MODEL, "pad")["choices"] == every  # not listed yet: every mode
    worker = start_worker(redis_url, image_modes=["default", "resize"])
    try:
        handlers.refresh_models(None, "")  # the page's periodic refresh, then its image modes
        shapes = handlers.image_modes(MODEL, "pad")
        assert shapes["choices"] == [("Resize", "resize"), ("Default", "default")] and shapes["value"] == "default"
        assert handlers.image_modes(MODEL, "resize")["value"] == "resize"
    finally:
        worker.stop()
    other = handlers.image_modes("llava-v1.5-7b", "pad")
    assert other["choices"] == every and other["value"] == "pad"
