"""Prompt building for the engine: the chat template, user text kept as text, and one call of the model's own
processor on the whole conversation with all its images (placeholders, special tokens and every extra input are
the processor's). Images of families whose image outputs stack per image are cached by digest."""

from __future__ import annotations

import copy
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from contract.errors import ImageInvalid, InvalidRequest, LlavaError
from contract.messages import JobImage, JobMessage, JobText
from workers.families import Family

# Put inside a special token's text typed by a user, so it is tokenized as text and never as the control token.
WORD_JOINER = "\u2060"


@dataclass
class ProcessedImage:
    """The image processor's tensors for one image (batch dim 1)."""

    tensors: dict[str, torch.Tensor]


@dataclass
class PromptInputs:
    """What the processor built for one prompt: its token ids [prompt] and every other model input (per-token
    ones, like `token_type_ids`, as 1-D [prompt] tensors; image tensors as the processor gave them)."""

    input_ids: torch.Tensor
    extras: dict[str, torch.Tensor]


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching the text of the tokenizer's control tokens: its special tokens (BOS/EOS, turn markers, image
    tokens...) and added tokens written as markup (`<...>`, `[...]`, `|`). Added tokens that are plain words or
    whitespace runs are left alone, so ordinary text tokenizes as it always does."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    for token in decoder.values():
        content = str(getattr(token, "content", token))
        if getattr(token, "special", False) or any(c in content for c in "<>[]|"):
            texts.add(content)
    texts = {t for t in texts if len(t) > 1 and t.strip()}
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def as_text(text: str, specials: re.Pattern[str] | None) -> str:
    """`text` with every special token's text broken by a word joiner after its first character, so the tokenizer
    reads it as plain text: a user who types `</s>` or a turn marker cannot end a turn or forge one."""
    if specials is None:
        return text
    return specials.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)


def render_messages(
    processor: Any,
    messages: list[JobMessage],
    image_token: str,
    n_images: int,
    *,
    specials: re.Pattern[str] | None = None,
    chat_template: str | None = None,
) -> str:
    """Apply the chat template (the processor's, or `chat_template`) with the generation prompt to job messages;
    validate image counts. Message text goes through `as_text` with `specials`."""
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
                content.append({"type": "text", "text": as_text(part.text, specials)})
        chat.append({"role": message.role, "content": content})
    if image_parts != n_images:
        raise InvalidRequest(f"messages have {image_parts} image parts but {n_images} images were given")
    kwargs = {"chat_template": chat_template} if chat_template else {}
    try:
        return processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - templates raise anything (jinja errors, TemplateError)
        raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from exc


# The image placeholder of prompts that come templated over LLaVA's wire format.
WIRE_IMAGE_TOKEN = "<image>"


def wire_prompt(prompt: str, image_text: str) -> str:
    """A prompt templated by a LLaVA client with the model's own text for an image (its image placeholder, and the
    markers its chat template writes around it) in place of `<image>`."""
    return prompt if image_text == WIRE_IMAGE_TOKEN else prompt.replace(WIRE_IMAGE_TOKEN, image_text)


def check_prompt(prompt: str, image_token: str, n_images: int) -> None:
    """A pre-templated prompt must carry exactly one image token per image."""
    found = prompt.count(image_token)
    if found != n_images:
        raise InvalidRequest(f"prompt has {found} {image_token!r} tokens but {n_images} images were given")


class ImageCache:
    """LRU of one image's image-processor tensors by content digest: multi-turn chats resend the same images every
    turn. Thread-safe."""

    def __init__(self, capacity: int = 128) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, ProcessedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str, compute: Callable[[], dict[str, torch.Tensor]]) -> ProcessedImage:
        """The processed image for `digest`, from `compute()` on a miss."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
                self.hits += 1
                return entry
            self.misses += 1
        entry = ProcessedImage(compute())
        with self._lock:
            self._entries[digest] = entry
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry


class _CachedImageProcessor:
    """Stands in for a processor's image processor during one call: each image's tensors come from the cache (or
    the real image processor, one image at a time), concatenated as the real one would for a stacking family."""

    def __init__(self, inner: Any, cache: ImageCache, digests: list[str]) -> None:
        self._inner = inner
        self._cache = cache
        self._digests = digests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        from transformers import BatchFeature
        from transformers.image_utils import make_flat_list_of_images

        images = make_flat_list_of_images(images)
        if len(images) != len(self._digests):
            raise InvalidRequest(f"{len(images)} images reached the image processor for {len(self._digests)} digests")
        kwargs["return_tensors"] = "pt"
        processed = [
            self._cache.get(digest, lambda image=image, digest=digest: _tensors(self._inner([image], **kwargs), digest))
            for digest, image in zip(self._digests, images, strict=True)
        ]
        return BatchFeature(stack_image_tensors(processed), tensor_type="pt")


def _tensors(out: Any, digest: str) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if "pixel_values" not in tensors:
        raise ImageInvalid(f"image {digest[:16]}: the image processor produced no pixels")
    return tensors


def build_inputs(
    processor: Any,
    family: Family,
    prompt: str,
    images: list[tuple[str, Image.Image]],
    cache: ImageCache | None = None,
) -> PromptInputs:
    """Run the model's processor once on the templated `prompt` with every (digest, image): the prompt's ids and
    extra inputs. Raise ImageInvalid when an image cannot be processed, InvalidRequest for anything else."""
    if family.needs_images and not images:
        raise InvalidRequest(f"model family {family.name} needs at least one image in the prompt")
    rgb = [image.convert("RGB") if image.mode != "RGB" else image for _, image in images]
    tokenizer = processor.tokenizer
    bos = getattr(tokenizer, "bos_token", None)
    kwargs: dict[str, Any] = {
        "text": [prompt],
        "return_tensors": "pt",
        # As apply_chat_template(tokenize=True) does: a template that writes BOS gets no second one.
        "add_special_tokens": not (bos and prompt.startswith(bos)),
        **family.processor_kwargs,
    }
    if rgb:
        kwargs["images"] = [rgb]  # one list per prompt, as apply_chat_template passes them (OneVision counts them)
    if rgb and cache is not None and family.images_stack:
        processor = copy.copy(processor)
        processor.image_processor = _CachedImageProcessor(processor.image_processor, cache, [d for d, _ in images])
    try:
        out = processor(**kwargs)
    except LlavaError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL and processors raise many types for bad images
        if rgb:
            names = ", ".join(d[:16] for d, _ in images)
            raise ImageInvalid(f"images ({names}) could not be preprocessed with the prompt: {exc}") from exc
        raise InvalidRequest(f"the processor rejected the prompt: {exc}") from exc
    input_ids = out["input_ids"][0]
    extras: dict[str, torch.Tensor] = {}
    for key, value in out.items():
        if key in ("input_ids", "attention_mask") or key in family.dropped or not isinstance(value, torch.Tensor):
            continue
        extras[key] = value[0] if key in family.per_token else value
    if rgb and "pixel_values" not in extras:
        raise ImageInvalid("the processor produced no pixels for the images")
    return PromptInputs(input_ids=input_ids, extras=extras)


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
