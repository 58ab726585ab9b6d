"""Random-weight LLaVA models of a few shapes for benchmarks, built locally (no downloads).

- tiny: the test model (workers.tiny_model): per-step overhead dominates, not a measure of batching.
- small: CLIP 224 px / patch 28 (64 image tokens), Llama hidden 512 x 8 layers: CPU-sized, compute-bound enough
  for batching to show.
- 7b: LLaVA-1.5-7B's shape (CLIP ViT-L/14 336 px, 24 layers; Llama 4096 hidden x 32 layers, vocab 32064), built
  straight on the target device in the target dtype (never materialised in float32 on the CPU).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

SHAPES = ("tiny", "small", "7b")


def _configs(shape: str, tokenizer: Any) -> tuple[Any, int, int]:
    """(LlavaConfig, image_size, patch_size) for a shape."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    if shape == "small":
        image_size, patch = 224, 28
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=image_size, patch_size=patch, projection_dim=256)  # fmt: skip
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                           tie_word_embeddings=False, **specials)  # fmt: skip
    elif shape == "7b":
        image_size, patch = 336, 14
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=image_size, patch_size=patch, projection_dim=768,
                                  hidden_act="quick_gelu")  # fmt: skip
        # The tokenizer is the tiny one (ids < 400); the vocabulary is the real model's size, which is what costs.
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           tie_word_embeddings=False, **specials)  # fmt: skip
    else:
        raise ValueError(f"shape must be one of small, 7b here (tiny is built by workers.tiny_model), not {shape!r}")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return config, image_size, patch


def build_in_memory(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) with random weights, created directly on `device` in `dtype`."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    from workers.tiny_model import build_tokenizer, copy_special_token_ids, llava_processor

    tokenizer = build_tokenizer()
    config, image_size, patch = _configs(shape, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():
        # Wider logits than the 0.02 init so greedy choices are well separated (as the tiny model does).
        model.lm_head.weight.normal_(0.0, 1.0)
    model.eval()
    copy_special_token_ids(model, tokenizer)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})  # fmt: skip
    return model, llava_processor(tokenizer, image_processor, patch, "default")


def build_model_dir(shape: str, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Build `shape` and save it at `path` (model name = the directory's name); reuse a complete earlier build."""
    from workers.tiny_model import build_tiny_model

    path = Path(path)
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    if shape == "tiny":
        return build_tiny_model(path)
    started = time.perf_counter()
    model, processor = build_in_memory(shape, device, dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    del model
    print(f"built {shape} model at {path} in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def build_loaded(shape: str, device: str, dtype: torch.dtype, workdir: Path):  # -> LoadedModel
    """A LoadedModel for the engine in-process, without writing the weights to disk (only the processor)."""
    from workers.model import load_model, wrap_model

    if shape == "tiny":
        dtype_name = str(dtype).removeprefix("torch.")
        return load_model(str(build_model_dir("tiny", Path(workdir) / "tiny-llava")), device=device, dtype=dtype_name)
    model, processor = build_in_memory(shape, device, dtype)
    return wrap_model(model, processor, device=device, dtype=dtype, name=f"{shape}-llava")
