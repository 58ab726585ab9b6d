"""Tiny random-weight checkpoints of each served family, built in-process (no hub), for the tests and benches.

Each uses the family's own config, model and processor classes (the slow PIL image processors, no torchvision),
a byte-level BPE tokenizer with the family's special tokens, and the LLaVA-1.5 style chat template with the family's
image placeholder (`workers.tiny_family_parts`). Attention is sharpened so that a wrong position or a missing token
changes the greedy text. The builders are grouped by how the family turns an image into tokens:
`workers.tiny_fixed` (a fixed count), `workers.tiny_tiled` (tiles) and `workers.tiny_native` (the image's own size).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from workers.model import LoadedModel
from workers.tiny_family_parts import checkpoints_root
from workers.tiny_fixed import build_gemma3, build_llava, build_paligemma
from workers.tiny_native import build_llava_pixtral, build_mistral3, build_qwen2_5_vl, build_qwen2_vl
from workers.tiny_tiled import (
    build_aya_vision,
    build_idefics3,
    build_internvl,
    build_llava_next,
    build_llava_onevision,
    build_smolvlm,
)

BUILDERS: dict[str, Callable[[], LoadedModel]] = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "idefics3": build_idefics3,
    "gemma3": build_gemma3,
    "paligemma": build_paligemma,
    "aya_vision": build_aya_vision,
    "llava_onevision": build_llava_onevision,
    "smolvlm": build_smolvlm,
    "internvl": build_internvl,
    "mistral3": build_mistral3,
    "llava-pixtral": build_llava_pixtral,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}


def model_type(name: str) -> str:
    """The family (config `model_type`) of builder `name`: `llava-pixtral` is a `llava`."""
    return name.split("-")[0]


@functools.cache
def family_loaded(name: str) -> LoadedModel:
    return BUILDERS[name]()


def checkpoint_path(name: str) -> Path:
    """The directory of a family's saved tiny checkpoint (the families built by `reloaded`)."""
    family_loaded(name)
    path = checkpoints_root() / f"tiny-{name}"
    if not path.is_dir():
        raise ValueError(f"family {name!r} is built in memory, not saved")
    return path
