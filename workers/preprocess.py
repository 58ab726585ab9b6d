"""Prompt rendering and image preprocessing for the engine: chat template, image tokens, a digest-keyed cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from contract.errors import ImageInvalid, InvalidRequest
from contract.messages import JobImage, JobMessage, JobText


@dataclass
class ProcessedImage:
    """What the model needs for one image: processor tensors (batch dim 1) and its expanded image-token count."""

    tensors: dict[str, torch.Tensor]
    num_tokens: int


def render_messages(processor: Any, messages: list[JobMessage], image_token: str, n_images: int) -> str:
    """Apply the model's chat template (with the generation prompt) to job messages; validate image counts."""
    if not messages:
        raise InvalidRequest("messages must not be empty")
    chat: list[dict[str, Any]] = []
    image_parts = 0
    for index, message in enumerate(messages):
        content: list[dict[str, str]] = []
        for part in message.content:
            if isinstance(part, JobImage):
                image_parts += 1
                content.append({"type": "image"})
            elif isinstance(part, JobText):
                if image_token in part.text:
                    raise InvalidRequest(
                        f"messages[{index}] text contains the literal image token {image_token!r}; "
                        "send images as image parts"
                    )
                content.append({"type": "text", "text": part.text})
        chat.append({"role": message.role, "content": content})
    if image_parts != n_images:
        raise InvalidRequest(f"messages have {image_parts} image parts but {n_images} images were given")
    try:
        return processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - templates raise anything (jinja errors, TemplateError)
        raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from exc


def check_prompt(prompt: str, image_token: str, n_images: int) -> None:
    """A pre-templated prompt must carry exactly one image token per image."""
    found = prompt.count(image_token)
    if found != n_images:
        raise InvalidRequest(f"prompt has {found} {image_token!r} tokens but {n_images} images were given")


class ImageCache:
    """LRU of preprocessed images by content digest: multi-turn chats resend the same images every turn.
    Thread-safe: jobs are prepared on several threads; an image is processed outside the lock."""

    def __init__(self, processor: Any, image_token: str, image_token_id: int, capacity: int = 128) -> None:
        self._processor = processor
        self._image_token = image_token
        self._image_token_id = image_token_id
        self.capacity = capacity
        self._entries: OrderedDict[str, ProcessedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str, image: Image.Image) -> ProcessedImage:
        """The processed image for `digest`, computing it from `image` on a miss."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
                self.hits += 1
                return entry
            self.misses += 1
        entry = self._process(digest, image)
        with self._lock:
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry

    def _process(self, digest: str, image: Image.Image) -> ProcessedImage:
        # Running the whole processor on one image token gives both the pixels and the model's own expansion
        # (fixed for LLaVA-1.5, size-dependent for LLaVA-NeXT) without knowing the model family.
        try:
            rgb = image.convert("RGB") if image.mode != "RGB" else image
            out = self._processor(text=self._image_token, images=[rgb], return_tensors="pt")
        except Exception as exc:  # noqa: BLE001 - PIL and processors raise many types for bad images
            raise ImageInvalid(f"image {digest[:16]} could not be preprocessed: {exc}") from exc
        num_tokens = int((out["input_ids"] == self._image_token_id).sum())
        tensors = {
            k: v for k, v in out.items() if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)
        }
        if num_tokens == 0 or "pixel_values" not in tensors:
            raise ImageInvalid(f"image {digest[:16]}: the processor produced no image tokens or pixels")
        return ProcessedImage(tensors=tensors, num_tokens=num_tokens)


def stack_image_tensors(images: list[ProcessedImage]) -> dict[str, torch.Tensor]:
    """Concatenate per-image processor outputs along the batch dim, zero-padding ragged dims (NeXT patches)."""
    if not images:
        return {}
    stacked: dict[str, torch.Tensor] = {}
    for key in images[0].tensors:
        parts = [img.tensors[key] for img in images]
        shape = [max(p.shape[d] for p in parts) for d in range(parts[0].dim())]
        padded = []
        for p in parts:
            if list(p.shape[1:]) != shape[1:]:
                full = p.new_zeros([p.shape[0], *shape[1:]])
                full[tuple(slice(0, s) for s in p.shape)] = p
                p = full
            padded.append(p)
        stacked[key] = torch.cat(padded, dim=0)
    return stacked
