"""Tiny checkpoints of the families that take an image at its own size, so its token count follows its size:
Pixtral's vision tower (Mistral 3, LLaVA with Pixtral) and Qwen2-VL / Qwen2.5-VL (with M-RoPE positions).
"""

from __future__ import annotations

from typing import Any

import torch

from workers.model import LoadedModel
from workers.processors import without_videos
from workers.tiny_family_parts import llama, reloaded, tokenizer


def pixtral_parts(spatial_merge_size: int) -> tuple[Any, Any, Any]:
    """A tokenizer with Pixtral's image tokens, a tiny Pixtral vision config and a PixtralProcessor (PIL images)."""
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from workers.processors import processor_class

    tok = tokenizer(extra=("[IMG]", "[IMG_BREAK]", "[IMG_END]"), image_token="[IMG]", placeholder="[IMG]")
    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
    )
    images = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})
    processor = processor_class("PixtralProcessor")(
        image_processor=images,
        tokenizer=tok,
        patch_size=8,
        spatial_merge_size=spatial_merge_size,
        chat_template=tok.chat_template,
    )
    return tok, vision, processor


def build_mistral3() -> LoadedModel:
    """Saved and reloaded: its processor (PixtralProcessor) is imported without torchvision."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok, vision, processor = pixtral_parts(spatial_merge_size=2)
    config = Mistral3Config(
        vision_config=vision,
        text_config=llama(tok, "MistralConfig", head_dim=16, sliding_window=None),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).eval()
    return reloaded(model, processor, tok, "mistral3")


def build_llava_pixtral() -> LoadedModel:
    """LLaVA with a Pixtral vision tower (as Pixtral 12B), saved and reloaded: a `llava` with PixtralProcessor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok, vision, processor = pixtral_parts(spatial_merge_size=1)
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama(tok, "MistralConfig", head_dim=16, sliding_window=None),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return reloaded(model, processor, tok, "llava-pixtral")


QWEN_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


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
    processor = without_videos(processor_class)(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    return reloaded(model, processor, tok, name)


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
