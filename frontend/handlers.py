"""What the UI's chat buttons do: add a message, stream a reply, stop, regenerate, clear (votes and flags are in
`frontend.feedback`).

Every handler is a plain method on `ChatHandlers` so tests can drive it without a browser; the Gradio layout in
`frontend.app` only wires components to these.
"""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import gradio as gr
from PIL import Image

from contract.client import ControllerClient
from contract.errors import LlavaError, StreamEnded, error_from_code
from contract.messages import (
    DoneEvent,
    ErrorEvent,
    FinishReason,
    GenerateRequest,
    QueuedEvent,
    SamplingParams,
    StreamEvent,
    TokenEvent,
)
from contract.replies import ModelInfo
from frontend.conversation import CURSOR, NO_IMAGE_HINT, ChatImage, Conversation, ImageMode, Turn, mode_choices
from frontend.feedback import why_not_votable
from frontend.reply_stream import ENDED, SILENT, STOPPED, ReplyStream
from frontend.texts import (
    NO_MODEL_CHOSEN,
    NO_MODEL_YET,
    NOT_AN_IMAGE,
    PAGE_FAILED,
    SERVICE_DOWN,
    STILL_WORKING,
    describe_error,
    terms_of_use,
    waiting_text,
)
from frontend.users import end_user
from infra.settings import WebSettings

log = logging.getLogger("llava.web")

# The buttons whose state follows the conversation, in this order in every handler's outputs.
BUTTONS = ("upvote", "downvote", "flag", "regenerate", "clear", "stop")


def _choices(models: list[ModelInfo]) -> list[tuple[str, str]]:
    return [(m.name, m.name) for m in models]


def _note_for_finish(reason: FinishReason) -> str:
    if reason is FinishReason.length:
        return "_(cut at the max output tokens limit)_"
    if reason is FinishReason.cancelled:
        return "_(stopped)_"
    return ""


class ChatHandlers:
    def __init__(self, settings: WebSettings, client: ControllerClient, *, still_working_after_s: float = 3.0):
        self.settings = settings
        self.client = client
        # A reply that hears nothing for this long says it is still working, so the page never looks frozen.
        self.still_working_after_s = still_working_after_s
        self._active: dict[str, ReplyStream] = {}  # each browser session's reply being streamed, for Stop
        self._writing: set[str] = set()  # the browser sessions with a `generate` call answering their messages
        self._lock = threading.Lock()
        self._models: list[ModelInfo] | None = None  # `once` mode: the list, once fetched successfully
        self._image_modes: dict[str, list[ImageMode]] = {}  # each model's modes, as the model list last said

    # ---- model list ------------------------------------------------------------------------------------------

    def fetch_models(self, user: str | None = None) -> tuple[list[ModelInfo], str | None]:
        """The model list (asked for `user`), and a message for the page when it could not be fetched or is empty."""
        if self.settings.model_list_mode == "once" and self._models:
            return self._models, None
        try:
            models = self.client.list_models(end_user=user)
        except LlavaError as exc:
            log.warning("model list: %s", exc)
            return [], SERVICE_DOWN
        if not models:
            log.info("model list: no live worker serves any model yet")
            return [], NO_MODEL_YET
        if self.settings.model_list_mode == "once":
            self._models = models  # only a list with models: an empty one is asked again
        self._image_modes.update({m.name: list(m.image_modes) for m in models})
        return models, None

    def load(self, request: gr.Request | None = None) -> tuple:
        """Page load: fresh state, the model dropdown (`?model=NAME` selects one), and a status line."""
        models, problem = self.fetch_models(end_user(request))
        wanted = request.query_params.get("model") if request is not None else None
        names = [m.name for m in models]
        value = wanted if wanted in names else (names[0] if names else None)
        status = problem or ""
        if wanted and wanted not in names and not problem:
            status = f"⚠️ The model `{wanted}` named in the address is not available; showing `{value}` instead."
        return (
            Conversation(),
            gr.update(choices=_choices(models), value=value),
            gr.update(value=status, visible=bool(status)),
        )

    def refresh_models(self, current: str | None, status: str | None, request: gr.Request | None = None) -> tuple:
        """The page's periodic refresh: (model dropdown, status line). A model chosen stays chosen; the first one
        served is chosen when none was. The status line shows a model list problem, and loses it once solved,
        but other notes there (a vote's) are left alone."""
        models, problem = self.fetch_models(end_user(request))
        names = [m.name for m in models]
        value = current if current else (names[0] if names else None)
        ours = not status or status in (SERVICE_DOWN, NO_MODEL_YET)
        if not ours or (status or "") == (problem or ""):
            note = gr.update()
        else:
            note = gr.update(value=problem or "", visible=bool(problem))
        return gr.update(choices=_choices(models), value=value), note

    def terms(self, request: gr.Request | None = None) -> str:
        """The terms of use, saying whether the service records conversations (it is asked at each page load)."""
        try:
            return terms_of_use(self.client.info(end_user=end_user(request)))
        except LlavaError as exc:
            log.warning("service info: %s", exc)
            return terms_of_use(None)

    def image_modes(self, model: str | None, mode: str | None) -> dict:
        """The pre-processing choices for `model`: the modes its workers support, as the model list last said (all of
        them for a model not listed). A mode no longer offered becomes Default, or the first one offered."""
        modes = self._image_modes.get(model or "", list(ImageMode))
        values = [value for _, value in mode_choices(modes)]
        fallback = ImageMode.default.value if ImageMode.default.value in values else values[0]
        return gr.update(choices=mode_choices(modes), value=mode if mode in values else fallback)

    # ---- chat -----------------------------------------------------------------------------------------------

    def button_updates(self, conversation: Conversation, *, generating: bool = False) -> list:
        votable = not generating and why_not_votable(conversation.last_reply) is None
        has_user = any(t.role == "user" for t in conversation.turns)
        return [
            gr.update(interactive=votable),
            gr.update(interactive=votable),
            gr.update(interactive=votable),
            gr.update(interactive=not generating and has_user),
            gr.update(interactive=not generating and bool(conversation.turns)),
            gr.update(interactive=generating),
        ]

    def chatbot_update(self, conversation: Conversation) -> dict:
        """The Chatbot's messages with the thumbs showing the votes recorded on each reply."""
        return gr.update(value=conversation.chatbot_messages(), feedback_value=conversation.feedback_values())

    def add_message(self, conversation: Conversation, message: dict | None, mode: str) -> tuple:
        """Append the user's text and images; the buttons wait for the reply. A message sent while a reply is written
        is answered next. The page empties the textbox when Send is pressed; a refused message is put back."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = list(message.get("files") or [])
        images = []
        for path in files:
            path = path.get("path") if isinstance(path, dict) else path
            try:
                images.append(ChatImage.from_file(path, mode or ImageMode.default, self.settings.image_max_side))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                # Never ask without the image the user attached: the model would answer about nothing.
                log.info("unreadable upload %s: %s", path, exc)
                gr.Warning(NOT_AN_IMAGE.format(name=Path(path).name))
                return (
                    conversation,
                    conversation.chatbot_messages(),
                    gr.update(value={"text": message.get("text") or "", "files": files}),
                    *self.button_updates(conversation, generating=conversation.replying),
                )
        if not text and not images:
            return (
                conversation,
                conversation.chatbot_messages(),
                gr.update(),
                *self.button_updates(conversation, generating=conversation.replying),
            )
        conversation.add_user(text, images)
        return (
            conversation,
            conversation.chatbot_messages(),
            gr.update(),  # already emptied by the page; emptying it now could wipe what was typed since
            *self.button_updates(conversation, generating=True),
        )

    def regenerate(self, conversation: Conversation) -> tuple:
        conversation.drop_last_reply()
        return (conversation, self.chatbot_update(conversation), *self.button_updates(conversation, generating=True))

    def clear(self, conversation: Conversation | None = None, request: gr.Request | None = None) -> tuple:
        """Forget the conversation (in place, so a reply still streaming cannot bring it back) and stop its reply."""
        self.stop(request)
        if conversation is None:
            conversation = Conversation()
        conversation.reset()
        return (
            conversation,
            self.chatbot_update(conversation),
            gr.update(value=None),
            gr.update(value="", visible=False),
            *self.button_updates(conversation),
        )

    def generate(self, conversation, model, temperature, top_p, max_new_tokens, request: gr.Request | None = None):
        """Stream a reply to the last user turn; yields (state, chatbot, *buttons) as the reply grows. One reply is
        written at a time per browser session: a message sent meanwhile is answered by the running call, next."""
        session = request.session_hash if request is not None and request.session_hash else f"anon-{id(conversation)}"
        user = end_user(request)
        with self._lock:
            running = session in self._writing
            self._writing.add(session)
        if running:  # the session's running call answers this message once its reply is done
            yield (conversation, conversation.chatbot_messages(), *self.button_updates(conversation, generating=True))
            return
        answered = False
        try:
            while True:
                with self._lock:  # checked under the lock: a message added now is seen here or by its own call
                    if not conversation.turns or conversation.turns[-1].role != "user":
                        self._writing.discard(session)
                        break
                answered = True
                yield from self._reply(conversation, model, temperature, top_p, max_new_tokens, session, user)
        finally:
            with self._lock:
                self._writing.discard(session)
        if not answered:  # nothing to answer (the message was refused, or the chat cleared)
            yield (conversation, conversation.chatbot_messages(), *self.button_updates(conversation))

    def _reply(self, conversation: Conversation, model, temperature, top_p, max_new_tokens, session: str, user=None):
        """Write one reply to the user turns at the end of `conversation`."""
        reply = conversation.start_reply()
        if not conversation.image_count():
            reply.hint = NO_IMAGE_HINT
        if not model:
            more = conversation.turns[-1] is not reply
            reply.status, reply.failed, reply.finished = NO_MODEL_CHOSEN, True, True
            yield (conversation, conversation.chatbot_messages(), *self.button_updates(conversation, generating=more))
            return
        reply.model = model
        reply.params = SamplingParams(
            temperature=float(temperature),
            top_p=max(0.01, float(top_p)),
            max_new_tokens=int(max_new_tokens),
            seed=random.randrange(2**31),  # recorded, so a voted or flagged reply can be replayed
        )
        body = GenerateRequest(model=model, messages=conversation.request_messages(), **reply.params.model_dump())
        active = ReplyStream(self.client, body, end_user=user)
        final = False  # a done or error event ended the reply: the job needs no cancel
        with self._lock:
            self._active[session] = active
        try:
            yield (conversation, conversation.chatbot_messages(), *self.button_updates(conversation, generating=True))
            while True:
                event = active.next(self.still_working_after_s)
                if event == SILENT:
                    if reply.status == STILL_WORKING:
                        continue
                    reply.status = STILL_WORKING
                elif event == STOPPED:
                    reply.status = _note_for_finish(FinishReason.cancelled)
                    break
                elif event == ENDED:
                    error = StreamEnded("the controller closed the stream before the reply ended")
                    reply.status, reply.failed = describe_error(error, model), True
                    break
                elif isinstance(event, Exception):
                    raise event
                elif not self._show_event(reply, event, model):
                    final = True
                    break
                yield (
                    conversation,
                    conversation.chatbot_messages(),
                    *self.button_updates(conversation, generating=True),
                )
        except LlavaError as exc:
            log.warning("reply for %s failed: %s: %s", model, exc.code, exc.message)
            reply.status, reply.failed = describe_error(exc, model), True
        except Exception:  # the reply's one catch point: shown in the chat rather than left spinning
            log.exception("generate for %s", model)
            reply.status, reply.failed = PAGE_FAILED, True
        finally:
            reply.finished = True  # also when Gradio closes the stream, so the next message is not refused
            with self._lock:
                if self._active.get(session) is active:
                    del self._active[session]
            active.stop()
            if not final:  # stopped, or the page went away: the worker stops too
                self._cancel(reply.job_id, user)
        more = (
            bool(conversation.turns) and conversation.turns[-1].role == "user"
        )  # a message sent meanwhile: answered next, Stop stays on
        yield (conversation, conversation.chatbot_messages(), *self.button_updates(conversation, generating=more))

    def _show_event(self, reply: Turn, event: StreamEvent, model: str) -> bool:
        """Apply `event` to `reply`; False when it ends the reply."""
        if reply.job_id is None:
            reply.job_id = event.job_id
        if isinstance(event, QueuedEvent):
            reply.status = waiting_text(event.position)
        elif isinstance(event, TokenEvent):
            # Tokenizers start a reply with a word's leading space; it is neither shown nor stored.
            reply.text = (reply.text + event.text).lstrip()
            reply.status = CURSOR
        elif isinstance(event, DoneEvent):
            reply.text = event.text.lstrip() or reply.text
            reply.status = _note_for_finish(event.finish_reason)
            return False
        elif isinstance(event, ErrorEvent):
            log.warning("job %s for %s failed: %s: %s", event.job_id, model, event.code, event.message)
            error = error_from_code(event.code, event.message)
            reply.status, reply.failed = describe_error(error, model), True
            return False
        return True

    def _cancel(self, job_id: str | None, user: str | None = None) -> None:
        """Cancel a job through the API; without a job id yet, the stream's close cancels it."""
        if job_id is None:
            return
        try:
            self.client.cancel(job_id, end_user=user)
        except LlavaError as exc:
            log.warning("cancel %s: %s", job_id, exc)

    def stop(self, request: gr.Request | None = None) -> None:
        """Stop this session's reply: it ends on the page at once, whatever the stream does, and the reply's
        handler cancels its job through the API (the job id comes with the stream's first event)."""
        session = request.session_hash if request is not None else None
        with self._lock:
            active = self._active.get(session) if session else None
        if active is not None:
            active.stop()
