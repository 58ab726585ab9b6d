"""Tiny random-weight checkpoints of each served family, built in-process (no hub), for the tests and benches.

Each uses the family's own config, model and processor classes (the slow PIL image processors, no torchvision),
a byte-level BPE tokenizer with the family's special tokens, and the LLaVA-1.5 style chat template with the family's
image placeholder. Attention is sharpened (query and key weights scaled) so that a wrong position or a missing
token changes the greedy text.
"""

from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers.model import LoadedModel, load_model, wrap_model
from workers.processors import without_videos
from workers.tiny_model import (
    _CORPUS,
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    build_bpe_tokenizer,
    copy_special_token_ids,
    ensure_tiny_model,
)

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
def _checkpoints() -> Path:
    root = Path(tempfile.mkdtemp(prefix="llava-families-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def reloaded(model: Any, processor: Any, tok: Any, name: str, seed: int = 0) -> LoadedModel:
    """`sharpen` the model, save it and its processor as a checkpoint and load that back through the worker's own
    load path (`load_model`: the processor without torchvision, the model through the Auto class)."""
    sharpen(model, tok, seed)
    path = _checkpoints() / f"tiny-{name}"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return load_model(str(path), device="cpu", dtype="float32")


def build_llava() -> LoadedModel:
    loaded = load_model(str(ensure_tiny_model(_checkpoints())), device="cpu", dtype="float32")
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
    path = _checkpoints() / f"tiny-{name}"
    if not path.is_dir():
        raise ValueError(f"family {name!r} is built in memory, not saved")
    return path
