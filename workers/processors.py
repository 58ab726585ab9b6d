"""Load a checkpoint's own processor class without torchvision: no video processor, PIL image processors.

Several processors (LLaVA-OneVision, SmolVLM, InternVL, Qwen2-VL) take a video processor, and every video
processor needs torchvision, which cannot be installed beside the pinned CPU torch. The worker serves images only,
so such a processor is loaded as `without_videos(cls)`: the same class with no video processor attribute, and a
stand-in that refuses videos. Pixtral's processor module imports its torchvision image processor module for one
function that the PIL module also defines; it is imported with the PIL module in that place.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from contextlib import contextmanager
from typing import Any

VIDEO = "video_processor"


class NoVideoProcessor:
    """Stands in for a processor's video processor: its sampling settings read as unset and videos are refused."""

    num_frames = None  # SmolVLM's apply_chat_template reads these two as defaults for its processor call
    fps = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("videos are not served: the processor was loaded without a video processor")


@functools.cache
def without_videos(cls: type) -> type:
    """`cls` (a ProcessorMixin class) with no video processor: it loads, saves and runs on text and images only,
    and its `video_processor` is a `NoVideoProcessor`. A class without a video processor is returned as is."""
    if VIDEO not in cls.get_attributes():
        return cls

    def get_attributes(klass: type) -> list[str]:
        return [name for name in cls.get_attributes() if name != VIDEO]

    def from_args_and_dict(klass: type, args: list[Any], processor_dict: dict[str, Any], **kwargs: Any) -> Any:
        # The video processor is an argument of the class's __init__ (required in some): it gets None.
        return cls.from_args_and_dict.__func__(klass, args, {**processor_dict, VIDEO: None}, **kwargs)

    namespace = {
        "__doc__": cls.__doc__,
        "__module__": cls.__module__,
        "get_attributes": classmethod(get_attributes),
        "from_args_and_dict": classmethod(from_args_and_dict),
        VIDEO: NoVideoProcessor(),
    }
    # Same name, so a saved processor_config.json names the checkpoint's own class.
    return type(cls.__name__, (cls,), namespace)


@contextmanager
def _pil_image_module(package: str, model: str):
    """While importing, `<package>.image_processing_<model>` (torchvision) is the PIL module of the same model."""
    name = f"{package}.image_processing_{model}"
    previous = sys.modules.get(name)
    sys.modules[name] = importlib.import_module(f"{package}.image_processing_pil_{model}")
    try:
        yield
    finally:
        if previous is None:
            del sys.modules[name]
        else:
            sys.modules[name] = previous


def processor_class(name: str) -> type:
    """The processor class called `name` from its transformers module; a module that needs torchvision only for
    its image processor module is imported with the PIL one instead."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    cls = processor_class_from_name(name)
    if cls is not None and not getattr(cls, "is_dummy", False):
        return cls
    model = next((m for m, n in PROCESSOR_MAPPING_NAMES.items() if n == name), None)
    if model is None:
        raise ValueError(f"no transformers processor class is called {name!r}")
    package = f"transformers.models.{model}"
    with _pil_image_module(package, model):
        module = importlib.import_module(f"{package}.processing_{model}")
    return getattr(module, name)


def _processor_class_name(path_or_id: str, **kwargs: Any) -> str | None:
    """The `processor_class` a checkpoint names in its processor, preprocessor or tokenizer config; else the
    processor class transformers maps its model type to."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import cached_file

    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        resolved = cached_file(path_or_id, file, _raise_exceptions_for_missing_entries=False, **kwargs)
        if resolved is not None:
            with open(resolved, encoding="utf-8") as f:
                name = json.load(f).get("processor_class")
            if name:
                return name
    model_type = getattr(AutoConfig.from_pretrained(path_or_id, **kwargs), "model_type", None)
    return PROCESSOR_MAPPING_NAMES.get(model_type)


def load_processor(path_or_id: str, **kwargs: Any) -> Any:
    """The checkpoint's processor (a local directory or a hub id; `kwargs` go to `from_pretrained`), loaded with
    no video processor and without torchvision. A checkpoint naming no known processor class goes through
    AutoProcessor."""
    name = _processor_class_name(path_or_id, **kwargs)
    if name is None:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path_or_id, **kwargs)
    return without_videos(processor_class(name)).from_pretrained(path_or_id, **kwargs)
