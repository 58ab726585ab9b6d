"""Votes and flags: the Upvote / Downvote / Flag buttons act on the last reply, the Chatbot's 👍 / 👎 on any reply.

Both send `POST /api/v1/feedback` with the conversation up to and including the judged reply, as that reply's
request was sent (model, sampling params and seed included), so `llava-serve replay` reproduces that turn.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator

import gradio as gr

from contract.client import ControllerClient
from contract.errors import LlavaError
from contract.feedback_messages import FeedbackRequest, FeedbackType
from contract.messages import SamplingParams
from frontend.conversation import Conversation, Turn
from frontend.users import end_user

# What the Chatbot's like event says in `LikeData.liked`: True for 👍, False for 👎, "" when the user clicks the
# selected thumb again to clear it (Gradio 6 sends no None).
LIKED = {True: FeedbackType.upvote, False: FeedbackType.downvote}
THUMB = {True: "Like", False: "Dislike"}  # the Chatbot's `feedback_value` for each
WITHDRAWN = ""


def why_not_votable(reply: Turn | None) -> str | None:
    """Why `reply` cannot be voted on or flagged, or None when it can."""
    if reply is None or reply.role != "assistant":
        return "There is no reply to vote on yet."
    if not reply.finished:
        return "⚠️ This reply is still being written: vote on it once it is finished."
    if reply.failed:
        return "⚠️ This reply is an error, not an answer from the model: there is nothing to vote on."
    if not reply.text:
        return "⚠️ This reply was stopped before any text: there is nothing to vote on."
    if reply.model is None:
        return "⚠️ This reply does not say which model wrote it, so it cannot be recorded."
    return None


def _status(text: str) -> dict:
    return gr.update(value=text, visible=True)


class FeedbackHandlers:
    def __init__(self, client: ControllerClient):
        self.client = client

    def record(
        self, kind: FeedbackType, conversation: Conversation, index: int, reason: str = "", user: str | None = None
    ) -> str | None:
        """Send a vote or flag on the reply `turns[index]` for `user`; returns the problem to show, or None once
        recorded."""
        reply = conversation.turns[index]
        problem = why_not_votable(reply)
        if problem is not None or reply.model is None:
            return problem
        feedback = FeedbackRequest(
            type=kind,
            model=reply.model,
            messages=conversation.reply_messages(index),
            reason=reason.strip() if kind is FeedbackType.flag else "",
            params=reply.params or SamplingParams(),
            job_ids=conversation.job_ids(index + 1),
            conversation_started_at=conversation.started_at,
            client_sent_at=time.time(),
        )
        try:
            self.client.send_feedback(feedback, end_user=user)
        except LlavaError as exc:
            return f"⚠️ Feedback not recorded: {exc.message}"
        if kind is not FeedbackType.flag:
            reply.vote = kind
        return None

    def feedback(
        self, kind: FeedbackType, conversation: Conversation, reason: str | None, request: gr.Request | None = None
    ) -> tuple:
        """A button's vote or flag on the last reply; returns (status, upvote, downvote, flag, reason box, chatbot),
        the chatbot's thumbs showing the vote."""
        unchanged = (gr.update(),) * 5
        if conversation.last_reply is None:
            return (_status(why_not_votable(None) or ""), *unchanged)
        problem = self.record(kind, conversation, len(conversation.turns) - 1, reason or "", end_user(request))
        if problem is not None:
            return (_status(problem), *unchanged)
        done = gr.update(interactive=False)
        if kind is FeedbackType.flag:
            note = "Flag recorded. Thank you for reporting this reply."
            return (_status(note), gr.update(), gr.update(), done, gr.update(value=""), gr.update())
        thumbs = gr.update(feedback_value=conversation.feedback_values())
        return (_status(f"Thanks, your {kind.value} was recorded."), done, done, gr.update(), gr.update(), thumbs)

    def vote_on_reply(self, conversation: Conversation, like: gr.LikeData, request: gr.Request | None = None) -> tuple:
        """A 👍 or 👎 on any reply in the Chatbot. Returns (status, chatbot, upvote, downvote): the thumbs show the
        recorded votes, and the vote buttons are disabled once the last reply has one."""
        thumbs = gr.update(feedback_value=conversation.feedback_values())
        found = conversation.shown_turn(like.index) if isinstance(like.index, int) else None
        if found is None:
            problem = f"⚠️ Message {like.index!r} is not in this conversation any more: vote on a reply shown now."
            return (_status(problem), thumbs, gr.update(), gr.update())
        index, shown = found
        problem = self._vote_problem(conversation.turns[index], shown, like)
        kind = LIKED.get(like.liked) if isinstance(like.liked, bool) else None
        if problem is None and kind is not None:
            problem = self.record(kind, conversation, index, user=end_user(request))
        if problem is not None or kind is None:
            return (_status(problem or ""), thumbs, gr.update(), gr.update())
        note = f"Thanks, your {kind.value} on reply {conversation.reply_number(index)} was recorded."
        buttons = gr.update(interactive=False) if index == len(conversation.turns) - 1 else gr.update()
        thumbs = gr.update(feedback_value=conversation.feedback_values())
        return (_status(note), thumbs, buttons, buttons)

    def on_like(
        self, conversation: Conversation, like: gr.LikeData, request: gr.Request | None = None
    ) -> Iterator[tuple]:
        """The Chatbot's like event: `vote_on_reply`'s outputs, preceded by the thumb as the browser already shows
        it when that is not what was recorded, since the browser redraws a thumb only when its value changes."""
        result = self.vote_on_reply(conversation, like, request)
        recorded = list(result[1]["feedback_value"])
        found = conversation.shown_turn(like.index) if isinstance(like.index, int) else None
        if found is not None and conversation.turns[found[0]].role == "assistant":
            position = conversation.reply_number(found[0]) - 1
            clicked = THUMB.get(like.liked) if isinstance(like.liked, bool) else None
            if recorded[position] != clicked:
                shown = recorded[:position] + [clicked] + recorded[position + 1 :]
                yield (gr.update(), gr.update(feedback_value=shown), gr.update(), gr.update())
        yield result

    @staticmethod
    def _vote_problem(reply: Turn, shown: str, like: gr.LikeData) -> str | None:
        """Why the like event `like` on `reply` (showing `shown`) records nothing, or None when it should."""
        if reply.role != "assistant":
            return "⚠️ Only the assistant's replies can be voted on."
        texts = like.value if isinstance(like.value, list) else [like.value]
        # The Chatbot shows text through inspect.cleandoc; a mismatch means the reply was replaced meanwhile.
        if not any(isinstance(t, str) and t.strip() == inspect.cleandoc(shown).strip() for t in texts):
            return "⚠️ This reply changed before your vote arrived: vote on it again."
        if like.liked == WITHDRAWN and reply.vote is not None:
            return (
                f"⚠️ Your {reply.vote.value} on this reply is already recorded and cannot be withdrawn; "
                "click the other thumb to change it."
            )
        if like.liked == WITHDRAWN:
            return "Nothing was recorded for this reply, so there is no vote to withdraw."
        kind = LIKED.get(like.liked) if isinstance(like.liked, bool) else None
        if kind is None:
            return f"⚠️ Unknown feedback {like.liked!r}: only 👍 and 👎 are recorded."
        if reply.vote is kind:
            return f"Your {kind.value} on this reply is already recorded."
        return why_not_votable(reply)
