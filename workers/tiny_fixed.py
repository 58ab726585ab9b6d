"""Tiny checkpoints of the families whose image is always the same number of tokens, whatever its size: LLaVA-1.5
(CLIP), Gemma 3 and PaliGemma (SigLIP).
"""

from __future__ import annotations

import copy

import torch

from workers.model import LoadedModel, load_model
from workers.tiny_family_parts import checkpoints_root, finish, llama, siglip, tokenizer
from workers.tiny_model import IMAGE_TOKEN, ensure_tiny_model


def build_llava() -> LoadedModel:
    loaded = load_model(str(ensure_tiny_model(checkpoints_root())), device="cpu", dtype="float32")
    return finish(copy.deepcopy(loaded.model), loaded.processor, loaded.tokenizer, "llava")


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
