"""What the page says to the person in front of it: what happened and what they can do, in their words.

Operator detail (worker ids, hosts, commands to run) never appears here: it stays in the controller's and the
page's logs and in the API's error bodies.
"""

from __future__ import annotations

from contract.errors import ErrorCode, LlavaError, QueueFull, RateLimited
from contract.replies import ServiceInfo

REGENERATE = "Press 🔄 **Regenerate** to ask again"

# The model list's problems, as the status line shows them; the page asks again every few seconds.
SERVICE_DOWN = "⚠️ The chat service is not reachable right now. This page keeps trying: no need to reload."
NO_MODEL_YET = "⚠️ No model is available yet. This page checks again every few seconds: no need to reload."

NO_MODEL_CHOSEN = "⚠️ No model is selected. Pick one from the list above, then press 🔄 **Regenerate**."
PAGE_FAILED = "⚠️ This page could not get the reply. Press 🔄 **Regenerate** to ask again."

STILL_WORKING = "⏳ _Still working on your reply… Press ⏹️ Stop if you do not want to wait._"

# Shown when the user sends a file that is not a picture; the message is not sent without it.
NOT_AN_IMAGE = (
    "“{name}” is not a picture this page can read, so your message was not sent. "
    "Remove it and attach a PNG, JPEG, GIF or WebP image instead."
)


TERMS_HEAD = """### Terms of use
This is a research preview for non-commercial use only. The model may produce wrong, offensive or biased output."""
TERMS_VOTES = """Votes and flags you send are stored with the whole conversation, images included, to improve the
service: please **Flag** replies that are harmful or wrong, and do not upload personal data."""


def terms_of_use(info: ServiceInfo | None) -> str:
    """The page's terms, saying whether conversations are recorded (`info` None: the service could not say)."""
    if info is None:
        recorded = "Conversations may be recorded, images included, to run and improve the service."
    elif info.conversation_log:
        kept = f" and kept for {info.log_retention_days:g} days" if info.log_retention_days else ""
        recorded = (
            f"**Conversations are recorded**: every message you send, its images and the replies are stored{kept}, "
            "to run and improve the service."
        )
    else:
        recorded = "Conversations are not recorded, except those you vote on or flag."
    return f"{TERMS_HEAD}\n{recorded}\n{TERMS_VOTES}"


def waiting_text(ahead: int) -> str:
    """What a reply shows while its request waits for the model, `ahead` requests before it."""
    if ahead <= 0:
        return "⏳ _Your request is next: the model is reading it, or finishing other replies first._"
    return f"⏳ _Waiting for the model: {ahead} request{'s' * (ahead != 1)} ahead of yours._"


def describe_error(exc: LlavaError, model: str | None) -> str:
    """What the user reads for a failure: what happened, and what they can do. The server's message is shown only
    when it is about what the user sent (an image, a request field); everything else goes to the logs."""
    name = f"The model `{model}`" if model else "The model"
    short = f"`{model}`" if model else "this model"
    code, message = exc.code, exc.message
    if code == ErrorCode.controller_unreachable:
        return (
            "⚠️ The chat service is not reachable right now. Wait a moment, then press 🔄 **Regenerate** to ask again."
        )
    if code == ErrorCode.no_worker:
        return f"⚠️ {name} is not available right now. Pick another model, or try again later: {REGENERATE}."
    if code == ErrorCode.model_not_found:
        return f"⚠️ {name} is not available any more. Pick another model from the list."
    if code == ErrorCode.queue_full:
        retry_after = exc.retry_after if isinstance(exc, QueueFull) else None
        wait = f"in {retry_after} s" if retry_after is not None else "in a moment"
        return f"⚠️ {name} has too many requests right now. Try again {wait}: {REGENERATE}."
    if code == ErrorCode.rate_limited:
        retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
        wait = f"in {retry_after} s" if retry_after is not None else "in a moment"
        return f"⚠️ You have sent many requests at once or in a short time. Try again {wait}: {REGENERATE}."
    if code in (ErrorCode.invalid_image, ErrorCode.image_too_large):
        return f"⚠️ An image could not be used: {message}. Attach a different image and send your question again."
    if code == ErrorCode.context_length_exceeded:
        return f"⚠️ This conversation is too long for {short}. Press 🗑️ **Clear** and start a shorter one."
    if code == ErrorCode.payload_too_large:
        return (
            "⚠️ This conversation is too large to send (too many or too big images). Press 🗑️ **Clear** and start again."
        )
    if code == ErrorCode.invalid_request:
        return f"⚠️ This request could not be sent as it is: {message}"
    if code == ErrorCode.reply_flagged:
        return (
            "⚠️ This reply was stopped because it went against the rules of this service. "
            f"Try asking in a different way: edit your message, or {REGENERATE[0].lower() + REGENERATE[1:]}."
        )
    if code == ErrorCode.worker_lost:
        return f"⚠️ The server writing this reply stopped before finishing it. {REGENERATE}."
    if code == ErrorCode.timeout:
        return f"⚠️ This reply took too long and was given up. {REGENERATE}."
    if code == ErrorCode.device_error:
        return f"⚠️ The model failed while writing this reply. {REGENERATE}."
    if code == ErrorCode.stream_ended:
        return f"⚠️ The connection to the chat service closed before this reply was finished. {REGENERATE}."
    return f"⚠️ Something went wrong on the server while writing this reply. {REGENERATE}."
