"""A tiny LLaVA built offline from random weights: real code paths for tests and benchmarks, no model hub."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

TINY_MODEL_NAME = "tiny-llava"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5 style: "USER: <image>\nWhat is this? ASSISTANT: It is ...</s>USER: ... ASSISTANT:"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}"
    "{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Enough text for the BPE to learn merges across ASCII, accents, CJK and emoji (multi-byte UTF-8 in tests).
_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: The image shows a red square on a white background.",
    "A cat sits on the mat. The dog runs in the park. Birds fly over the blue sea.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_+=*/\\|@#$%^&~`",
    "Describe the picture in detail. There is a small house, a tree and a car next to the road.",
    "Café, naïve, résumé, Ünïcödé, straße, ñandú, façade, smörgåsbord.",
    "日本語のテキスト、中文文本、한국어 텍스트。",
    "Emoji: 🙂 😀 🚀 🐱 🌍 ✨ ❤️ 👍",
    "Large language models answer questions about images, charts, documents and photos.",
]


def build_bpe_tokenizer(
    corpus: list[str],
    vocab_size: int,
    *,
    extra_special: tuple[str, ...] = (),
    image_token: str = IMAGE_TOKEN,
    chat_template: str = CHAT_TEMPLATE,
    named: dict[str, str] | None = None,
):  # -> TokenizersBackend (PreTrainedTokenizerFast)
    """A byte-level BPE trained on `corpus`, with LLaVA-1.5's special tokens (and `extra_special`) and chat
    template, padding left. `named` adds attributes naming special tokens (Gemma 3's `boi_token`...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *(t for t in extra_special if t not in SPECIAL_TOKENS)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": image_token, **(named or {})},
        additional_special_tokens=[t for t in extra_special if t not in SPECIAL_TOKENS],
        chat_template=chat_template,
        add_bos_token=False,
        padding_side="left",
    )


def build_tokenizer(vocab_size: int = 400):  # -> TokenizersBackend (PreTrainedTokenizerFast)
    """The tiny model's tokenizer (also used by the benchmark models)."""
    return build_bpe_tokenizer(_CORPUS * 4, vocab_size)


def llava_processor(tokenizer: Any, image_processor: Any, patch_size: int, feature_strategy: str) -> Any:
    """A LlavaProcessor with the chat template, `<image>` and the CLS token counted as one more image token."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=feature_strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def copy_special_token_ids(model: Any, tokenizer: Any) -> None:
    """The tokenizer's BOS, EOS and pad ids into the model's generation config (what `generate` and EOS use)."""
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build a tiny random-weight LLaVA (CLIP 32 px / patch 8 -> 16 image tokens, 2-layer Llama) at `path`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    path = Path(path)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer)
    image_size, patch_size = 32, 8

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # Random init is tiny (std 0.02); larger logits make greedy choices well separated so batch == alone exactly.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    copy_special_token_ids(model, tokenizer)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = llava_processor(tokenizer, image_processor, patch_size, "default")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ensure_tiny_model(cache_dir: Path, seed: int = 0) -> Path:
    """Return `cache_dir/tiny-llava`, building it once (in a temp dir, then an atomic rename)."""
    cache_dir = Path(cache_dir)
    target = cache_dir / TINY_MODEL_NAME
    if (target / "config.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llava-", dir=cache_dir))
    try:
        build_tiny_model(tmp, seed=seed)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its copy is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_model_command(dir: Path) -> int:
    """`llava-serve tiny-model DIR`: build the tiny model into DIR (name it tiny-llava) and say where."""
    path = build_tiny_model(Path(dir))
    print(f"built a tiny random-weight LLaVA at {path} (model name {path.resolve().name!r})")
    return 0
