"""What the engine needs to know of each model family, in one place: which families are served exactly and how
their prompts' extra inputs batch.

The family's own processor builds the whole prompt (placeholders, special tokens, every extra tensor) and the
model's own machinery gives positions (`workers.positions`); a `Family` only says what the engine cannot find out by
itself. A family listed here was checked token for token against `generate` (tests/workers/test_families.py); any
other model type is refused at start, so no model is served wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Position schemes (`Family.positions`; workers.positions computes them).
ROPE = "rope"  # one position per token: a prompt's are 0..n-1, each new token one further
MROPE = "mrope"  # three axes (temporal, height, width) from the model's get_rope_index; a rope delta per prompt


@dataclass(frozen=True)
class Family:
    """One served family, by the config's `model_type`."""

    name: str
    # The processor's outputs that are never model inputs (PaliGemma's `labels` when a suffix is given).
    dropped: frozenset[str] = frozenset({"labels"})
    # Outputs of one row per token (shape [1, prompt]): left-padded with 0 like the prompt when jobs batch.
    per_token: frozenset[str] = frozenset({"token_type_ids", "mm_token_type_ids"})
    # True when the image processor's output for several images is each image's output concatenated (zero-padded
    # where ragged) along dim 0: then one image's tensors are cached by digest and reused across jobs.
    images_stack: bool = False
    # True when the compiled decode step (fixed slots, a 4-D mask) is exact for the family.
    compiled: bool = True
    # Keyword arguments for the processor call.
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    # The chat template when the checkpoint has none.
    chat_template: str | None = None
    # True when the processor cannot take a prompt without an image.
    needs_images: bool = False
    # How the model places tokens: ROPE or MROPE.
    positions: str = ROPE
    # The text an image takes in a prompt, when the processor expands its image token but the chat template writes
    # more around it (what `<image>` of a prompt templated over LLaVA's wire format becomes; `{}`: the image token).
    image_text: str = "{}"


# PaliGemma checkpoints have no chat template: every image placeholder first, then the turns' text, one line each
# (the processor writes BOS after the last image and the closing newline, as the model was trained on:
# `<image>...<bos>prefix\n`).
PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is not string %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% if not loop.last %}{{ '\n' }}{% endif %}{% endfor %}"
)


# Qwen's chat template writes the vision markers around the image token, which the processor expands alone.
QWEN_IMAGE_TEXT = "<|vision_start|>{}<|vision_end|>"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llava", images_stack=True),
        Family("llava_next", images_stack=True),
        Family("idefics3"),
        Family("aya_vision", compiled=False),
        # token_type_ids (per token) give the bidirectional attention within each image at prefill; the compiled
        # step's 4-D mask would drop the sliding window of its local layers, so it runs eager.
        Family("gemma3", compiled=False),
        # The processor returns `labels` (dropped) and token_type_ids (the prefix attends both ways).
        Family("paligemma", images_stack=True, compiled=False, chat_template=PALIGEMMA_TEMPLATE, needs_images=True),
        # A prompt's images reach the processor as one list: a lone image is tiled (anyres), several are one padded
        # square each, and `batch_num_images` tells the model which.
        Family("llava_onevision"),
        Family("smolvlm"),
        Family("internvl"),
        # Pixtral keeps each image's aspect ratio: ragged pixel tensors prefill in groups of one shape.
        Family("mistral3"),
        # M-RoPE: the model's get_rope_index places an image's tokens on its grid; each prompt's next position is
        # its token count plus a rope delta, which every decode step adds. Images stack: each image's patches
        # (pixel_values) and its grid (image_grid_thw, one row per image).
        Family("qwen2_vl", images_stack=True, positions=MROPE, image_text=QWEN_IMAGE_TEXT),
        Family("qwen2_5_vl", images_stack=True, positions=MROPE, image_text=QWEN_IMAGE_TEXT),
    )
}


class UnsupportedFamily(ValueError):
    """The model's family is not served: the message names it and says why."""


def family_of(config: Any) -> Family:
    """The `Family` of a model config; raise UnsupportedFamily naming the family and why it is not served."""
    model_type = getattr(config, "model_type", None) or "unknown"
    family = FAMILIES.get(model_type)
    if family is not None:
        return family
    served = ", ".join(sorted(FAMILIES))
    why = "not a family this worker knows"
    raise UnsupportedFamily(f"model family {model_type!r} is not served: {why} (served: {served})")
