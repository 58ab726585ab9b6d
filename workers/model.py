"""Load an image-text-to-text checkpoint (LLaVA-1.5, LLaVA-NeXT, ...): its own processor class (`load_processor`,
no torchvision) and the model through AutoModelForImageTextToText."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from contract.errors import InvalidRequest
from workers.families import FAMILIES, Family, UnsupportedFamily, family_of
from workers.processors import load_processor

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for the engine: weights on `device`, its processor and what the engine needs to know."""

    model: Any
    processor: Any
    tokenizer: Any
    device: str
    dtype: torch.dtype
    context_length: int
    eos_token_ids: set[int]
    image_token: str
    image_token_id: int
    name: str = ""
    pad_token_id: int = 0
    chat_template: str | None = None
    cache_kwarg: str = "cache"  # the forward's KV cache argument: `cache`, or `past_key_values` before 5.2x
    extra: dict[str, Any] = field(default_factory=dict)
    family: Family = field(default_factory=lambda: FAMILIES["llava"])  # how the engine treats the model's family


def resolve_device(device: str) -> str:
    """auto -> cuda when available, else cpu; cpu, cuda and cuda:N pass through after a check."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        return device
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto -> bfloat16 on CUDA when supported (else float16), float32 on CPU."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def _context_length(config: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text_config, config):
        value = getattr(source, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.get_text_config(), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def load_model(model_path: str, *, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load processor and model from a local directory; raise InvalidRequest naming the path when unusable."""
    from transformers import AutoModelForImageTextToText

    path = Path(model_path)
    if not path.is_dir() or not (path / "config.json").exists():
        raise InvalidRequest(f"model path {model_path!r} is not a directory with a config.json")
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    try:
        from transformers import AutoConfig

        family = family_of(AutoConfig.from_pretrained(path))
    except UnsupportedFamily as exc:  # refused before loading any weights
        raise InvalidRequest(f"model path {model_path!r}: {exc}") from exc

    try:
        processor = load_processor(str(path))
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear message
        raise InvalidRequest(f"model path {model_path!r}: cannot load a processor ({exc})") from exc
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise InvalidRequest(f"model path {model_path!r} has no image processor + tokenizer (not image-text-to-text)")
    chat_template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not chat_template and not family.chat_template:
        raise InvalidRequest(f"model path {model_path!r} has no chat template on its processor or tokenizer")

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    model.to(resolved_device)
    return wrap_model(model, processor, device=resolved_device, dtype=torch_dtype, name=path.resolve().name)


def cache_kwarg(model: Any) -> str:
    """The name `model.forward` takes its KV cache by: `cache` in recent transformers 5 releases (which still accept
    `past_key_values` with a deprecation warning), `past_key_values` in earlier ones."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def wrap_model(model: Any, processor: Any, *, device: str, dtype: torch.dtype, name: str) -> LoadedModel:
    """A LoadedModel around a model already on `device` in `dtype` and its processor (also for in-process builds)."""
    family = family_of(model.config)
    model.eval()
    tokenizer = processor.tokenizer
    chat_template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    chat_template = chat_template or family.chat_template
    image_token = getattr(processor, "image_token", None) or "<image>"
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_index", None)
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    loaded = LoadedModel(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        context_length=_context_length(model.config),
        eos_token_ids=_eos_ids(model, tokenizer),
        image_token=image_token,
        image_token_id=int(image_token_id),
        name=name,
        pad_token_id=int(pad_token_id),
        chat_template=chat_template,
        cache_kwarg=cache_kwarg(model),
        family=family,
    )
    log.info(
        "loaded %s (family %s) on %s (%s), context %d",
        loaded.name, family.name, loaded.device, str(dtype), loaded.context_length,
    )  # fmt: skip
    return loaded
