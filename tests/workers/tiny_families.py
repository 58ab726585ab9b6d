"""Tiny random-weight checkpoints of each served family, built in-process (no hub) once per test session.

Each uses the family's own config, model and processor classes (the slow PIL image processors, no torchvision),
a byte-level BPE tokenizer with the family's special tokens, and the LLaVA-1.5 style chat template with the family's
image placeholder. Attention is sharpened (query and key weights scaled) so that a wrong position or a missing
token changes the greedy text.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch

from workers.model import LoadedModel, wrap_model
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


def finish(model: Any, processor: Any, tok: Any, name: str, seed: int = 0) -> LoadedModel:
    """Sharpen the language model's attention, spread its output logits and wrap it as the engine loads it."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if "vision" in module_name or not module_name.endswith(("q_proj", "k_proj")):
                continue
            module.weight.mul_(SHARPEN)
        head = model.get_output_embeddings()
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
    copy_special_token_ids(model, tok)
    return wrap_model(model, processor, device="cpu", dtype=torch.float32, name=f"tiny-{name}")


def build_llava() -> LoadedModel:
    from tests.workers.tiny_llava import tiny_loaded

    loaded = tiny_loaded()
    return finish(copy.deepcopy(loaded.model), loaded.processor, loaded.tokenizer, "llava")


def build_llava_next() -> LoadedModel:
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tokenizer()
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=llama(tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=tok.chat_template,
        num_additional_image_tokens=1,
    )
    return finish(model, processor, tok, "llava_next")


def build_idefics3() -> LoadedModel:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    grid = tuple(f"<row_{r}_col_{c}>" for r in range(1, 3) for c in range(1, 3))
    tok = tokenizer(extra=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *grid))
    vision = Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=llama(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template
    )
    return finish(model, processor, tok, "idefics3")


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


def build_gemma3() -> LoadedModel:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = tokenizer(
        extra=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        image_token="<image_soft_token>",
        placeholder="<start_of_image>",
        named=named,
    )
    text = llama(tok, "Gemma3TextConfig", head_dim=16, sliding_window=12)
    config = Gemma3Config(
        text_config=text,
        vision_config=siglip(),
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(
        image_processor=images, tokenizer=tok, chat_template=tok.chat_template, image_seq_length=4
    )
    return finish(model, processor, tok, "gemma3")


def build_paligemma() -> LoadedModel:
    """No chat template, as on real checkpoints: the family's template is used."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tokenizer()
    tok.chat_template = None
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)  # adds its <loc>/<seg> tokens
    config = PaliGemmaConfig(
        vision_config=siglip(),
        text_config=llama(tok, "GemmaConfig", head_dim=16),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vocab_size=len(tok),
        projection_dim=64,
        hidden_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config).eval()
    return finish(model, processor, tok, "paligemma")


def build_aya_vision() -> LoadedModel:
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    markers = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")
    tok = tokenizer(extra=markers)
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4)
    processor = AyaVisionProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=8,
        img_size=32,
        downsample_factor=2,
        chat_template=tok.chat_template,
    )
    config = AyaVisionConfig(
        vision_config=siglip(),
        text_config=llama(tok, "Cohere2Config", head_dim=16, sliding_window=12),
        downsample_factor=2,
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AyaVisionForConditionalGeneration(config).eval()
    return finish(model, processor, tok, "aya_vision")


QWEN_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def image_only(processor_class: type) -> type:
    """`processor_class` (a Qwen processor) without its video processor, which needs torchvision."""

    class ImageOnly(processor_class):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

    ImageOnly.__name__ = processor_class.__name__
    return ImageOnly


def qwen(config_class: type, model_class: type, processor_class: type, vision: dict[str, Any], name: str):
    """A tiny Qwen-VL: 8-pixel patches merged 2 x 2 (an image of 16 to 64 tokens), M-RoPE over head_dim 16."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tokenizer(
        extra=QWEN_MARKERS,
        image_token="<|image_pad|>",
        placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        named={"video_token": "<|video_pad|>"},
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_MARKERS}
    text = llama(tok, config_class.__name__.replace("Config", "TextConfig"))
    text.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = config_class(
        text_config=text.to_dict(),
        vision_config={"depth": 2, "num_heads": 2, "patch_size": 8, "spatial_merge_size": 2, **vision},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    images = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64
    )
    processor = image_only(processor_class)(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    return finish(model, processor, tok, name)


def build_qwen2_vl() -> LoadedModel:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
    return qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision, "qwen2_vl")


def build_qwen2_5_vl() -> LoadedModel:
    """Window attention over 2 x 2 merged patches in the first vision layer, full attention in the second."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "window_size": 32,
        "fullatt_block_indexes": [1],
    }
    return qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision, "qwen2_5_vl")


BUILDERS: dict[str, Callable[[], LoadedModel]] = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "idefics3": build_idefics3,
    "gemma3": build_gemma3,
    "paligemma": build_paligemma,
    "aya_vision": build_aya_vision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}


@functools.cache
def family_loaded(name: str) -> LoadedModel:
    return BUILDERS[name]()
