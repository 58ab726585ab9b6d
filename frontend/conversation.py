"""A chat's state in the UI: turns with their images, as sent to the controller and as shown in the Chatbot."""

from __future__ import annotations

import base64
import hashlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from PIL import Image, ImageOps

from broker.messages import ChatMessage, ImageUrl, ImageUrlPart, SamplingParams, TextPart

# CLIP's mean pixel, the background LLaVA pads with.
PAD_COLOUR = (122, 116, 104)
CURSOR = "▌"


class ImageMode(str, Enum):
    crop = "Crop"  # center-crop to a square
    resize = "Resize"  # stretch to a square
    pad = "Pad"  # pad to a square with PAD_COLOUR
    default = "Default"  # as uploaded


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


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    started_at: float | None = None
    model: str | None = None
    params: SamplingParams | None = None  # of the last request, seed included

    def add_user(self, text: str, images: list[ChatImage]) -> None:
        if self.started_at is None:
            self.started_at = time.time()
        self.turns.append(Turn(role="user", text=text, images=list(images)))

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

    def image_count(self) -> int:
        return sum(len(t.images) for t in self.turns)

    def request_messages(self, *, include_last_reply: bool = False) -> list[ChatMessage]:
        """The whole conversation in OpenAI format, images as PNG data URLs; failed replies left out."""
        turns = self.turns
        if not include_last_reply and turns and turns[-1].role == "assistant":
            turns = turns[:-1]
        messages = []
        for turn in turns:
            if turn.role == "assistant":
                if not turn.text:  # a failed or stopped-before-any-token reply
                    continue
                messages.append(ChatMessage(role="assistant", content=turn.text))
                continue
            parts: list[TextPart | ImageUrlPart] = [
                ImageUrlPart(image_url=ImageUrl(url=png_data_url(img.png))) for img in turn.images
            ]
            if turn.text:
                parts.append(TextPart(text=turn.text))
            messages.append(ChatMessage(role="user", content=parts))
        return messages

    def job_ids(self) -> list[str | None]:
        return [t.job_id for t in self.turns if t.role == "assistant"]

    def chatbot_messages(self) -> list[dict]:
        """Gradio 6 Chatbot messages: one per image, then the text; a reply shows its status after the text."""
        shown: list[dict] = []
        for turn in self.turns:
            if turn.role == "user":
                for img in turn.images:
                    shown.append({"role": "user", "content": {"path": img.path, "alt_text": "uploaded image"}})
                if turn.text:
                    shown.append({"role": "user", "content": turn.text})
                continue
            content = turn.text
            if turn.status and not (turn.finished and turn.status == CURSOR):
                if turn.status == CURSOR or not content:
                    content = content + turn.status
                else:
                    content = f"{content}\n\n{turn.status}"
            shown.append({"role": "assistant", "content": content})
        return shown
