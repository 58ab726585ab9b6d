"""Votes and flags from the buttons (last reply) and the Chatbot's thumbs (any reply), against the real controller
and the `llava:feedback` stream."""

from __future__ import annotations

import inspect
import time

import gradio as gr
import redis

from broker.feedback import feedback_generate_request, feedback_images, read_feedback
from contract import keys
from contract.feedback_messages import FeedbackType
from frontend.conversation import Conversation
from frontend.feedback import FeedbackHandlers
from frontend.handlers import ChatHandlers
from infra.settings import WebSettings
from tests.frontend.conftest import MODEL, RecordingClient, as_parts, chat, picture


def ui(controller_url: str) -> tuple[ChatHandlers, FeedbackHandlers, RecordingClient]:
    client = RecordingClient(controller_url)
    return ChatHandlers(WebSettings(controller_url=controller_url), client), FeedbackHandlers(client), client


def thumb(conv: Conversation, turn: int, liked: bool | str = True, value: str | None = None) -> gr.LikeData:
    """The like event the browser sends for a thumb on `conv.turns[turn]`: its Chatbot index and shown text."""
    shown = conv.chatbot_messages()
    position = next(i for i in range(len(shown)) if conv.shown_turn(i)[0] == turn)
    text = inspect.cleandoc(shown[position]["content"]) if value is None else value
    return gr.LikeData(None, {"index": position, "value": [text], "liked": liked})


def test_votes_and_flags_reach_the_feedback_stream(controller_url, scripted_worker, tmp_path, redis_url):
    handlers, votes, client = ui(controller_url)
    conv = Conversation()
    chat(handlers, conv, "what shape is it", [picture(tmp_path)])
    status, up, down, flag, _, thumbs = votes.feedback(FeedbackType.upvote, conv, "ignored for votes")
    assert status["value"] == "Thanks, your upvote was recorded." and up["interactive"] is False
    assert thumbs["feedback_value"] == ["Like"]  # the reply's 👍 shows the vote
    status, *_ = votes.feedback(FeedbackType.flag, conv, "  made up an answer ")
    assert status["value"].startswith("Flag recorded")
    r = redis.Redis.from_url(redis_url)
    upvote, flagged = read_feedback(r)
    assert (upvote.type, upvote.reason, flagged.type, flagged.reason) == (
        FeedbackType.upvote,
        "",
        FeedbackType.flag,
        "made up an answer",
    )
    assert flagged.model == MODEL and flagged.job_ids == [conv.last_reply.job_id]
    assert flagged.params.seed == client.sent[-1].seed
    (digest,) = flagged.images
    assert r.ttl(keys.image(digest)) > 364 * 86400  # kept for as long as the entry (feedback retention, 365 days)
    assert feedback_images(r, flagged)[digest] == conv.turns[0].images[0].png
    replayed = feedback_generate_request(r, flagged)
    assert replayed == client.sent[-1]
    assert time.time() - flagged.received_at < 60


def test_a_thumb_on_an_earlier_reply_records_that_turn(controller_url, scripted_worker, tmp_path, redis_url):
    handlers, votes, client = ui(controller_url)
    conv = Conversation()
    chat(handlers, conv, "what shape is it", [picture(tmp_path)])  # turns 0-1, request 0
    chat(handlers, conv, "[[device-error]] then fail")  # turns 2-3: the scripted worker fails it
    chat(handlers, conv, "and the colour", [picture(tmp_path, "q.png", (200, 0, 0))])  # turns 4-5, request 2
    assert conv.turns[3].failed and not conv.turns[5].failed

    status, thumbs, up, down = votes.vote_on_reply(conv, thumb(conv, 1, True))
    assert status["value"] == "Thanks, your upvote on reply 1 was recorded."
    assert thumbs["feedback_value"] == ["Like", None, None]
    assert up == down == gr.update()  # the buttons act on the last reply, which has no vote yet
    status, thumbs, up, down = votes.vote_on_reply(conv, thumb(conv, 5, False))
    assert status["value"] == "Thanks, your downvote on reply 3 was recorded."
    assert thumbs["feedback_value"] == ["Like", None, "Dislike"] and up["interactive"] is down["interactive"] is False
    status, thumbs, *_ = votes.vote_on_reply(conv, thumb(conv, 1, False))  # changed its mind: a new entry
    assert status["value"] == "Thanks, your downvote on reply 1 was recorded."
    assert thumbs["feedback_value"] == ["Dislike", None, "Dislike"]

    r = redis.Redis.from_url(redis_url)
    first, last, changed = read_feedback(r)
    assert (first.type, last.type, changed.type) == (FeedbackType.upvote, FeedbackType.downvote, FeedbackType.downvote)
    # The earlier reply's record is that turn: its request, reply, job, seed and image, and nothing after it.
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert first.messages[-1].content[0].text == conv.turns[1].text
    assert first.job_ids == [conv.turns[1].job_id] and first.params == conv.turns[1].params
    assert first.images == [conv.turns[0].images[0].digest]
    assert feedback_generate_request(r, first) == as_parts(client.sent[0])
    assert changed.messages == first.messages and changed.params.seed == client.sent[0].seed
    # The last reply's record leaves out the failed exchange, as its request did.
    assert [m.role for m in last.messages] == ["user", "assistant", "user", "assistant"]
    assert last.job_ids == [conv.turns[1].job_id, conv.turns[5].job_id]
    assert feedback_generate_request(r, last) == as_parts(client.sent[2])


def test_thumbs_that_record_nothing_say_why(controller_url, scripted_worker, redis_url):
    handlers, votes, _ = ui(controller_url)
    conv = Conversation()
    chat(handlers, conv, "hello there")
    chat(handlers, conv, "[[device-error]] then fail")

    def status_of(like: gr.LikeData) -> str:
        return votes.vote_on_reply(conv, like)[0]["value"]

    assert "is an error, not an answer from the model" in status_of(thumb(conv, 3))
    assert status_of(gr.LikeData(None, {"index": 0, "value": ["hello there"], "liked": True})) == (
        "⚠️ Only the assistant's replies can be voted on."
    )
    assert "not in this conversation any more" in status_of(gr.LikeData(None, {"index": 9, "value": [], "liked": True}))
    assert "changed before your vote arrived" in status_of(thumb(conv, 1, value="an older reply"))
    assert "no vote to withdraw" in status_of(thumb(conv, 1, ""))
    assert "only 👍 and 👎 are recorded" in status_of(thumb(conv, 1, "Spam"))
    assert status_of(thumb(conv, 1, True)) == "Thanks, your upvote on reply 1 was recorded."
    assert status_of(thumb(conv, 1, True)) == "Your upvote on this reply is already recorded."
    assert "already recorded and cannot be withdrawn" in status_of(thumb(conv, 1, ""))
    assert [e.type for e in read_feedback(redis.Redis.from_url(redis_url))] == [FeedbackType.upvote]
    # The browser toggles a thumb before the handler runs; a refused one is first echoed, then put back.
    echoed, result = votes.on_like(conv, thumb(conv, 3, False))
    assert echoed[1]["feedback_value"] == ["Like", "Dislike"] and result[1]["feedback_value"] == ["Like", None]
    assert "is an error" in result[0]["value"]
    echoed, result = votes.on_like(conv, thumb(conv, 1, ""))
    assert echoed[1]["feedback_value"] == [None, None] and result[1]["feedback_value"] == ["Like", None]
    (recorded,) = votes.on_like(conv, thumb(conv, 1, False))  # the browser already shows what is recorded
    assert recorded[1]["feedback_value"] == ["Dislike", None]
