"""Each family's processor loads through `load_processor` with no torchvision: processor classes that take a video
processor load without one, and Pixtral's processor module imports without its torchvision image processor."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

from workers.processors import NoVideoProcessor, load_processor, processor_class, without_videos
from workers.tiny_families import checkpoint_path, family_loaded
from workers.tiny_family_parts import tokenizer

SAVED = {
    "llava_onevision": "LlavaOnevisionProcessor",
    "smolvlm": "SmolVLMProcessor",
    "internvl": "InternVLProcessor",
    "mistral3": "PixtralProcessor",
    "llava-pixtral": "PixtralProcessor",
}


def no_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return not is_torchvision_available()


def picture(size: tuple[int, int] = (40, 30)) -> Image.Image:
    gen = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand((size[1], size[0], 3), generator=gen) * 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("family", sorted(SAVED))
def test_a_saved_checkpoint_loads_its_own_processor_class(family):
    path = checkpoint_path(family)
    processor = load_processor(str(path))
    assert type(processor).__name__ == SAVED[family]
    assert isinstance(processor, processor_class(SAVED[family]))
    assert "video_processor" not in processor.get_attributes()
    assert type(processor.image_processor).__name__.endswith("Pil")  # the PIL image processor, not torchvision's
    saved = json.loads((path / "processor_config.json").read_text())
    assert saved["processor_class"] == SAVED[family] and "video_processor" not in saved
    assert type(family_loaded(family).processor) is type(processor)


@pytest.mark.skipif(not no_torchvision(), reason="torchvision is installed: AutoProcessor loads video processors")
def test_autoprocessor_cannot_load_a_processor_that_needs_a_video_processor():
    from transformers import AutoProcessor

    with pytest.raises(Exception, match="(?i)video.?processor"):
        AutoProcessor.from_pretrained(checkpoint_path("smolvlm"))


def test_a_processor_class_that_requires_a_video_processor_loads_without_one():
    from transformers import SmolVLMProcessor

    cls = without_videos(SmolVLMProcessor)
    assert cls.__name__ == "SmolVLMProcessor" and issubclass(cls, SmolVLMProcessor)
    assert cls.get_attributes() == ["image_processor", "tokenizer"]
    processor = cls.from_pretrained(checkpoint_path("smolvlm"))
    assert processor.image_seq_len == 4  # the saved settings reach __init__
    assert isinstance(processor.video_processor, NoVideoProcessor)
    with pytest.raises(ValueError, match="videos are not served"):
        processor.video_processor([picture()])
    assert without_videos(processor_class("PixtralProcessor")) is processor_class("PixtralProcessor")


@pytest.mark.skipif(not no_torchvision(), reason="torchvision is installed: Pixtral's module imports as it is")
def test_pixtrals_processor_imports_without_its_torchvision_image_processor():
    cls = processor_class("PixtralProcessor")
    assert not getattr(cls, "is_dummy", False)
    assert cls.__module__ == "transformers.models.pixtral.processing_pixtral"
    # The PIL module stood in only while importing.
    assert "transformers.models.pixtral.image_processing_pixtral" not in sys.modules


def test_qwen2_vls_processor_loads_and_builds_image_inputs(tmp_path):
    """Qwen2-VL's processor takes a video processor too: loaded without one, it expands the image placeholder."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    markers = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    tok = tokenizer(extra=markers, image_token="<|image_pad|>", placeholder=placeholder)
    images = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2)
    saved = without_videos(Qwen2VLProcessor)(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    saved.save_pretrained(tmp_path)
    processor = load_processor(str(tmp_path))
    assert type(processor).__name__ == "Qwen2VLProcessor"
    out = processor(
        text=[f"USER: {placeholder}\nhi ASSISTANT:"],
        images=[[picture((40, 30))]],
        return_tensors="pt",
    )
    grid = out["image_grid_thw"][0]
    placeholders = int((out["input_ids"][0] == tok.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert placeholders == int(grid.prod()) // 4 > 0
    assert out["pixel_values"].shape[0] == int(grid.prod())
