"""A chat's state in the UI: turns with their images, as sent to the controller and as shown in the Chatbot."""

from __future__ import annotations

import base64
import hashlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from contract.feedback_messages import FeedbackType
from contract.messages import ChatMessage, ImageMode, ImageUrl, ImageUrlPart, SamplingParams, TextPart

# CLIP's mean pixel, the background LLaVA pads with.
PAD_COLOUR = (122, 116, 104)
CURSOR = "▌"
# Shown under a failed or empty reply: the exchange is not sent to the model with the next message.
LEFT_OUT = "_(left out of the conversation the model sees)_"
# Marks a reply that cannot be voted on (still streaming, failed or empty): the page's CSS hides its thumbs.
NO_VOTE = '<span class="no-vote"></span>'
# Shown under a reply to a conversation without any image, so that nobody takes it for an answer about a picture.
NO_IMAGE_HINT = (
    "_(No image is attached: this reply comes from your text alone. Attach one with the clip to ask about it.)_"
)


# What the page's mode choice reads for each `ImageMode`.
MODE_LABELS = {ImageMode.crop: "Crop", ImageMode.resize: "Resize", ImageMode.pad: "Pad", ImageMode.default: "Default"}


def mode_choices(modes: list[ImageMode]) -> list[tuple[str, str]]:
    """The page's (label, value) choices for `modes`, in `ImageMode` order."""
    return [(MODE_LABELS[m], m.value) for m in ImageMode if m in modes]


def preprocess_image(image: Image.Image, mode: ImageMode | str, max_side: int) -> Image.Image:
    """`image` in RGB, made square as `mode` says, then with its long side at most `max_side`."""
    mode = ImageMode(mode)
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        base = Image.new("RGB", rgba.size, (255, 255, 255))
        base.paste(rgba, mask=rgba.getchannel("A"))
        image = base
    else:
        image = image.convert("RGB")
    w, h = image.size
    if mode is ImageMode.crop and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif mode is ImageMode.resize and w != h:
        side = min(max(w, h), max_side)
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    elif mode is ImageMode.pad and w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), PAD_COLOUR)
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image = square
    w, h = image.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return image


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def display_dir() -> Path:
    """Where the UI writes the processed images the Chatbot shows (inside the temp dir Gradio may serve)."""
    path = Path(tempfile.gettempdir()) / "llava-serve-web"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ChatImage:
    """One processed image: PNG bytes, named by their sha256 (as the controller stores them)."""

    png: bytes
    digest: str
    path: str  # the copy the Chatbot displays

    @classmethod
    def from_image(cls, image: Image.Image, mode: ImageMode | str, max_side: int) -> ChatImage:
        png = encode_png(preprocess_image(image, mode, max_side))
        digest = hashlib.sha256(png).hexdigest()
        path = display_dir() / f"{digest}.png"
        if not path.exists():
            path.write_bytes(png)
        return cls(png=png, digest=digest, path=str(path))

    @classmethod
    def from_file(cls, path: str | Path, mode: ImageMode | str, max_side: int) -> ChatImage:
        with Image.open(path) as image:
            image.load()
            return cls.from_image(image, mode, max_side)


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str = ""
    images: list[ChatImage] = field(default_factory=list)
    job_id: str | None = None
    status: str = ""  # assistant: a queue position or error note shown instead of / after the text
    finished: bool = False
    failed: bool = False  # an error reply: shown, never sent back to the model
    model: str | None = None  # assistant: the model asked and the params sent (seed included), so a vote on
    params: SamplingParams | None = None  # this reply can be replayed
    vote: FeedbackType | None = None  # assistant: the last up- or downvote recorded on it
    hint: str = ""  # assistant: a note for the user shown last, never sent to the model

    @property
    def answered(self) -> bool:
        """An assistant turn the model sees as history: finished, not failed, and with text."""
        return self.role == "assistant" and self.finished and not self.failed and bool(self.text)


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    started_at: float | None = None

    def add_user(self, text: str, images: list[ChatImage]) -> None:
        if self.started_at is None:
            self.started_at = time.time()
        self.turns.append(Turn(role="user", text=text, images=list(images)))

    def reset(self) -> None:
        """Forget every turn, in place: a reply still streaming into this object then writes to a detached turn."""
        self.turns.clear()
        self.started_at = None

    def start_reply(self) -> Turn:
        """Append an empty assistant turn (dropping a previous unfinished one) and return it."""
        if self.turns and self.turns[-1].role == "assistant":
            self.turns.pop()
        turn = Turn(role="assistant", status=CURSOR)
        self.turns.append(turn)
        return turn

    def drop_last_reply(self) -> bool:
        """Remove the last assistant turn (for Regenerate); False when there is no user turn to answer."""
        if self.turns and self.turns[-1].role == "assistant":
            self.turns.pop()
        return bool(self.turns) and self.turns[-1].role == "user"

    @property
    def last_reply(self) -> Turn | None:
        if self.turns and self.turns[-1].role == "assistant":
            return self.turns[-1]
        return None

    @property
    def replying(self) -> bool:
        """True while the last reply is still being generated."""
        return self.last_reply is not None and not self.last_reply.finished

    def image_count(self) -> int:
        return sum(len(t.images) for t in self.turns)

    def _exchanges(self, end: int) -> list[tuple[list[Turn], Turn | None]]:
        """What the model sees of `turns[:end]`: each run of user turns with its answer (None for the question
        at the end). A failed, empty or unfinished reply leaves its exchange out; it stays on screen."""
        exchanges: list[tuple[list[Turn], Turn | None]] = []
        asking: list[Turn] = []
        for turn in self.turns[:end]:
            if turn.role == "user":
                asking.append(turn)
                continue
            if turn.answered:
                exchanges.append((asking, turn))
            asking = []
        if asking:
            exchanges.append((asking, None))
        return exchanges

    def _messages(self, end: int) -> list[ChatMessage]:
        messages = []
        for asking, reply in self._exchanges(end):
            if asking:
                messages.append(_user_message(asking))
            if reply is not None:
                messages.append(ChatMessage(role="assistant", content=reply.text))
        return messages

    def request_messages(self, *, include_last_reply: bool = False) -> list[ChatMessage]:
        """The conversation in OpenAI format, images as PNG data URLs. Failed exchanges are left out; user turns
        with no reply between them (a message sent before the previous one was answered) are sent as one."""
        end = len(self.turns)
        if not include_last_reply and self.last_reply is not None:
            end -= 1
        return self._messages(end)

    def reply_messages(self, index: int) -> list[ChatMessage]:
        """The request that produced the answered reply `turns[index]`, followed by that reply."""
        turn = self.turns[index]
        if not turn.answered:
            raise ValueError(f"turns[{index}] is not an answered reply (role {turn.role}, failed {turn.failed})")
        return self._messages(index + 1)

    def job_ids(self, end: int | None = None) -> list[str | None]:
        """The job of each assistant message `request_messages` sends for `turns[:end]`, in order."""
        exchanges = self._exchanges(len(self.turns) if end is None else end)
        return [reply.job_id for _, reply in exchanges if reply is not None]

    def _shown(self) -> list[tuple[int, dict]]:
        """Each Chatbot message with the index of the turn it shows."""
        shown: list[tuple[int, dict]] = []
        for index, turn in enumerate(self.turns):
            if turn.role == "user":
                for img in turn.images:
                    shown.append((index, {"role": "user", "content": {"path": img.path, "alt_text": "uploaded image"}}))
                if turn.text:
                    shown.append((index, {"role": "user", "content": turn.text}))
                continue
            content = turn.text
            if turn.status and not (turn.finished and turn.status == CURSOR):
                if turn.status == CURSOR or not content:
                    content = content + turn.status
                else:
                    content = f"{content}\n\n{turn.status}"
            if turn.finished and not turn.answered:
                content = f"{content}\n\n{LEFT_OUT}" if content else LEFT_OUT
            if turn.hint:
                content = f"{content}\n\n{turn.hint}" if content else turn.hint
            if not (turn.finished and turn.answered):
                content = NO_VOTE + content  # the page's CSS hides this reply's 👍 / 👎
            shown.append((index, {"role": "assistant", "content": content}))
        return shown

    def chatbot_messages(self) -> list[dict]:
        """Gradio 6 Chatbot messages: one per image, then the text; a reply shows its status after the text."""
        return [message for _, message in self._shown()]

    def shown_turn(self, position: int) -> tuple[int, str] | None:
        """The turn index behind Chatbot message `position` and the text it shows; None when out of range."""
        shown = self._shown()
        if not 0 <= position < len(shown):
            return None
        index, message = shown[position]
        content = message["content"]
        return index, content if isinstance(content, str) else ""

    def reply_number(self, index: int) -> int:
        """Which reply `turns[index]` is, counting from 1 (as the user reads them)."""
        return sum(t.role == "assistant" for t in self.turns[: index + 1])

    def feedback_values(self) -> list[str | None]:
        """The Chatbot's `feedback_value`: the recorded vote on each assistant message, in order."""
        names = {FeedbackType.upvote: "Like", FeedbackType.downvote: "Dislike"}
        return [names.get(t.vote) if t.vote else None for t in self.turns if t.role == "assistant"]


def _user_message(turns: list[Turn]) -> ChatMessage:
    """One user message for consecutive user turns: their images in order, then their texts."""
    parts: list[TextPart | ImageUrlPart] = [
        ImageUrlPart(image_url=ImageUrl(url=png_data_url(img.png))) for turn in turns for img in turn.images
    ]
    text = "\n\n".join(turn.text for turn in turns if turn.text)
    if text:
        parts.append(TextPart(text=text))
    return ChatMessage(role="user", content=parts)
