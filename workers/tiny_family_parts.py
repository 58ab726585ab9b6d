"""The pieces every tiny family checkpoint (`workers.tiny_families`) is built from: a byte-level BPE tokenizer
with the family's special tokens and the LLaVA-1.5 style chat template with its image placeholder, small Llama-like
text and SigLIP vision configs, and the last step, which sharpens attention (query and key weights scaled, so that
a wrong position or a missing token changes the greedy text) and either wraps the model as the engine loads it or
saves it and loads it back through the worker's own load path.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from workers.model import LoadedModel, load_model, wrap_model
from workers.tiny_model import _CORPUS, CHAT_TEMPLATE, IMAGE_TOKEN, build_bpe_tokenizer, copy_special_token_ids

SHARPEN = 10.0  # query and key weights are multiplied by this: attention logits by its square


def template_for(placeholder: str) -> str:
    """The tiny chat template, an image part written as `placeholder` (the processor's text for one image)."""
    template = CHAT_TEMPLATE.replace("'<image>\n'", "'" + placeholder + "\n'")
    assert placeholder in template
    return template


def tokenizer(
    extra: tuple[str, ...] = (),
    image_token: str = IMAGE_TOKEN,
    placeholder: str = IMAGE_TOKEN,
    named: dict[str, str] | None = None,
):
    return build_bpe_tokenizer(
        _CORPUS * 4,
        400,
        extra_special=extra,
        image_token=image_token,
        chat_template=template_for(placeholder),
        named=named,
    )


def llama(tok: Any, cls_name: str = "LlamaConfig", **kw: Any) -> Any:
    import transformers

    return getattr(transformers, cls_name)(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **kw,
    )


def siglip(image_size: int = 32) -> Any:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )


def sharpen(model: Any, tok: Any, seed: int = 0) -> None:
    """Sharpen the language model's attention, spread its output logits and give it the tokenizer's special ids."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if "vision" in module_name:
                continue
            if module_name.endswith(("q_proj", "k_proj")):
                module.weight.mul_(SHARPEN)
            elif module_name.endswith(("q_norm", "k_norm")):  # Gemma 3 normalises queries and keys after projecting
                module.weight.fill_(SHARPEN - 1.0)  # its norms scale by (1 + weight)
        head = model.get_output_embeddings()
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
    copy_special_token_ids(model, tok)


def finish(model: Any, processor: Any, tok: Any, name: str, seed: int = 0) -> LoadedModel:
    """`sharpen` the model and wrap it as the engine loads it."""
    sharpen(model, tok, seed)
    return wrap_model(model, processor, device="cpu", dtype=torch.float32, name=f"tiny-{name}")


@functools.cache
def checkpoints_root() -> Path:
    """The temporary directory (removed at exit) the tiny checkpoints are saved in."""
    root = Path(tempfile.mkdtemp(prefix="llava-families-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def reloaded(model: Any, processor: Any, tok: Any, name: str, seed: int = 0) -> LoadedModel:
    """`sharpen` the model, save it and its processor as a checkpoint and load that back through the worker's own
    load path (`load_model`: the processor without torchvision, the model through the Auto class)."""
    sharpen(model, tok, seed)
    path = checkpoints_root() / f"tiny-{name}"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return load_model(str(path), device="cpu", dtype="float32")
