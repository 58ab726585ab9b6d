"""Tiny checkpoints of the families that cut an image into tiles (and most add a downscaled whole view): LLaVA-NeXT
and LLaVA-OneVision (any-resolution grids), Idefics3 and SmolVLM, Aya Vision and InternVL (crops to patches).
"""

from __future__ import annotations

import torch

from workers.model import LoadedModel
from workers.processors import without_videos
from workers.tiny_family_parts import finish, llama, reloaded, siglip, tokenizer
from workers.tiny_model import IMAGE_TOKEN


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


def build_llava_onevision() -> LoadedModel:
    """Saved and reloaded: its processor class takes a video processor, loaded without one."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = tokenizer(extra=("<video>",))
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=siglip(),
        text_config=llama(tok, "Qwen2Config"),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = without_videos(LlavaOnevisionProcessor)(
        image_processor=images,
        tokenizer=tok,
        video_processor=None,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=tok.chat_template,
    )
    return reloaded(model, processor, tok, "llava_onevision")


def idefics(config_class: type, model_class: type, vision_class: type, images_class: type, extra: tuple[str, ...]):
    """A tiny Idefics3 or SmolVLM (its descendant): 32 px tiles of 8 px patches, merged 2 x 2 (4 tokens a tile)."""
    grid = tuple(f"<row_{r}_col_{c}>" for r in range(1, 3) for c in range(1, 3))
    tok = tokenizer(extra=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *extra, *grid))
    vision = vision_class(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = config_class(
        vision_config=vision,
        text_config=llama(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    images = images_class(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    return model, images, tok


def build_idefics3() -> LoadedModel:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    model, images, tok = idefics(
        Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, Idefics3ImageProcessorPil, ()
    )
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template
    )
    return finish(model, processor, tok, "idefics3")


def build_smolvlm() -> LoadedModel:
    """Saved and reloaded: its processor class takes a video processor, loaded without one."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor, SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    model, images, tok = idefics(
        SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig, SmolVLMImageProcessorPil, ("<video>",)
    )
    processor = without_videos(SmolVLMProcessor)(
        image_processor=images, tokenizer=tok, video_processor=None, image_seq_len=4, chat_template=tok.chat_template
    )
    return reloaded(model, processor, tok, "smolvlm")


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


def build_internvl() -> LoadedModel:
    """Saved and reloaded: its processor class takes a video processor, loaded without one."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, InternVLVisionConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = tokenizer(extra=tuple(named.values()), image_token="<IMG_CONTEXT>", placeholder="<IMG_CONTEXT>", named=named)
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[32, 32],
        patch_size=[8, 8],
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=llama(tok, "Qwen2Config"),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4)
    processor = without_videos(InternVLProcessor)(
        image_processor=images, tokenizer=tok, video_processor=None, image_seq_length=4, chat_template=tok.chat_template
    )
    return reloaded(model, processor, tok, "internvl")
