"""Train the demo LLaVA offline on drawn shapes, in two stages: a vision warm-up with attribute heads on the CLIP
tower, then the whole model on templated conversations (loss on answer tokens, heads kept as an auxiliary loss).

Deterministic given a seed on one machine (fixed step counts; the time budget only cuts a slow run short).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.demo.data import messages, random_sample, random_scene
from workers.demo.shapes import COLOURS, KINDS, MAX_SHAPES, POSITIONS, Scene, render
from workers.tiny_model import IMAGE_TOKEN, build_bpe_tokenizer, copy_special_token_ids, llava_processor

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "llava-v1-shapes-demo"
# Trained on whole drawings of any aspect ratio, each stretched to a square by its processor: "default" and "resize"
# show it what it saw; a crop cuts shapes off and grey padding is a border it never saw.
DEMO_IMAGE_MODES = ("default", "resize")
# 64 px (8 x 8 patches): at 56 px a small circle in a 3:2 image (radius 0.1 of the shorter side) is ~4 px across
# its squashed axis, and was often answered "square".
IMAGE_SIZE, PATCH_SIZE = 64, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # patches and the CLS token
ANSWER_PREFIX = "ASSISTANT:"
_HEADS = {"colour": len(COLOURS), "shape": len(KINDS), "position": len(POSITIONS), "count": MAX_SHAPES}


def demo_model_path() -> Path:
    """The directory of the trained demo model shipped inside the package (HF format, loads with load_model)."""
    return Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Recipe:
    images: int = 24_000  # pre-rendered training images; each step draws fresh questions about them
    vision_steps: int = 1_200
    vision_batch: int = 64
    vision_lr: float = 2e-3
    steps: int = 1_000
    batch: int = 32
    lr: float = 2e-3
    aux_weight: float = 0.3
    head_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # colour, shape, position, count


# ---- model, tokenizer and processor -----------------------------------------------------------------------------


def build_tokenizer() -> Any:
    """A byte-level BPE trained on the demo's questions and answers, with the LLaVA chat template."""
    from workers.demo.data import corpus

    return build_bpe_tokenizer(corpus() * 4 + ["USER: ASSISTANT:"] * 8, vocab_size=512)


def build_processor(tokenizer: Any) -> Any:
    """Every image is resized to IMAGE_SIZE square (no centre crop, so nothing near an edge is cut off)."""
    from transformers import CLIPImageProcessor

    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return llava_processor(tokenizer, image_processor, PATCH_SIZE, "full")


def build_model(tokenizer: Any, seed: int) -> Any:
    """CLIP 64 px / patch 8 (64 patch tokens + CLS, 4 layers of 128) and a 3-layer Llama of 128 in LLaVA."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,  # the last layer is the one the warm-up heads train
        vision_feature_select_strategy="full",  # the CLS token too: the heads teach it every attribute
        projector_hidden_act="gelu",
        image_seq_length=IMAGE_TOKENS,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    copy_special_token_ids(model, tokenizer)
    return model


# ---- data -------------------------------------------------------------------------------------------------------


def labels_of(scene: Scene) -> list[int]:
    """Head targets (colour, shape, position, count - 1); -100 where a multi-shape scene has no single answer."""
    if scene.count == 1 and scene.position is not None:
        shape = scene.shapes[0]
        return [list(COLOURS).index(shape.colour), KINDS.index(shape.kind), POSITIONS.index(scene.position), 0]
    return [-100, -100, -100, scene.count - 1]


def render_dataset(processor: Any, n: int, seed: int, progress: bool = False) -> tuple[list[Scene], Any, Any]:
    """`n` scenes drawn at random sizes (some JPEG) and preprocessed: scenes, pixels [n,3,S,S] fp16, labels [n,4]."""
    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    scenes, chunks = [], []
    bar = tqdm(total=n, desc="drawing", disable=not progress, leave=False)
    for start in range(0, n, 256):
        batch = [random_scene(rng) for _ in range(min(256, n - start))]
        images = [render(scene, rng) for scene in batch]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        chunks.append(pixels.to(torch.float16))
        scenes += batch
        bar.update(len(batch))
    bar.close()
    labels = torch.tensor([labels_of(s) for s in scenes], dtype=torch.long)
    return scenes, torch.cat(chunks), labels


def encode_conversation(tokenizer: Any, chat: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a whole templated conversation (image tokens expanded as the engine does) and labels that
    keep only the assistant answers and their end-of-sequence token."""
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * IMAGE_TOKENS)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_token_id:
        ids, offsets = ids[1:], offsets[1:]
    spans, at = [], 0
    while (start := text.find(ANSWER_PREFIX, at)) >= 0:
        end = text.find(tokenizer.eos_token, start) + len(tokenizer.eos_token)
        spans.append((start + len(ANSWER_PREFIX), end))
        at = end
    labels = [
        tok if any(lo <= a and b <= hi for lo, hi in spans) else -100 for tok, (a, b) in zip(ids, offsets, strict=True)
    ]
    return ids, labels


def collate(tokenizer: Any, rows: list[tuple[list[int], list[int]]]) -> tuple[Any, Any, Any]:
    """Right-pad to the longest row: input ids, attention mask, labels."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, mask, labels


# ---- training ---------------------------------------------------------------------------------------------------


class AttributeHeads:
    """Attribute heads on the tower's last layer: one on the CLS token, which the language model sees as the first
    image token (so it can read every attribute in one place), one on pooled patches (fast local features)."""

    def __init__(self, hidden: int, weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)) -> None:
        import torch

        self.weights = weights  # per attribute, in _HEADS order: the hardest (shape) can count more
        out = sum(_HEADS.values())
        self.cls = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, out))
        self.pooled = torch.nn.Sequential(torch.nn.LayerNorm(2 * hidden), torch.nn.Linear(2 * hidden, out))
        self.net = torch.nn.ModuleList([self.cls, self.pooled])

    def logits(self, features: Any) -> tuple[list[Any], list[Any]]:
        """CLS logits and pooled logits per head; the pool is mean and max, as the max keeps a small shape's local
        evidence that the mean dilutes."""
        import torch

        patches = features[:, 1:]
        pooled = torch.cat([patches.mean(dim=1), patches.amax(dim=1)], dim=-1)
        sizes = list(_HEADS.values())
        return list(self.cls(features[:, 0]).split(sizes, dim=-1)), list(self.pooled(pooled).split(sizes, dim=-1))

    def loss(self, features: Any, labels: Any) -> tuple[Any, Any]:
        """Weighted mean cross-entropy over both heads' four attributes, and the CLS head's accuracy per attribute."""
        import torch.nn.functional as F

        cls_logits, pooled_logits = self.logits(features)
        losses, accs = [], []
        for i, (a, b) in enumerate(zip(cls_logits, pooled_logits, strict=True)):
            target = labels[:, i]
            valid = target != -100
            for head_logits in (a, b):
                ce = F.cross_entropy(head_logits, target, ignore_index=-100) if valid.any() else head_logits.sum() * 0
                losses.append(self.weights[i] * ce)
            accs.append((a.argmax(-1)[valid] == target[valid]).float().mean())
        return sum(losses) / (2 * sum(self.weights)), accs


def _schedule(step: int, total: int, warmup: int = 40) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _patch_features(model: Any, pixels: Any) -> Any:
    return model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]


def train(
    dir: Path | str, seed: int = 0, minutes_budget: float = 15.0, progress: bool = True, recipe: Recipe | None = None
) -> Path:
    """Train the demo model from scratch and save it in HF format at `dir`; stop early (with a warning) when
    `minutes_budget` runs out, which only happens on a slower machine than the default recipe was sized for."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    recipe = recipe or Recipe()
    started = time.monotonic()
    deadline = started + minutes_budget * 60
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed)
    heads = AttributeHeads(model.config.vision_config.hidden_size, recipe.head_weights)
    scenes, pixels, head_labels = render_dataset(processor, recipe.images, seed, progress)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed + 1)
    cut_short = False

    # Stage 1: the vision tower alone learns colour, shape, position and count from pooled patch features.
    tower = model.model.vision_tower
    params = [*tower.parameters(), *heads.net.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    bar = tqdm(range(recipe.vision_steps), desc="vision warm-up", disable=not progress)
    for step in bar:
        if time.monotonic() > deadline:
            cut_short = True
            break
        for group in opt.param_groups:
            group["lr"] = recipe.vision_lr * _schedule(step, recipe.vision_steps)
        idx = torch.randint(0, len(scenes), (recipe.vision_batch,), generator=gen)
        loss, accs = heads.loss(_patch_features(model, pixels[idx].float()), head_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc="/".join(f"{a.item():.2f}" for a in accs))
    bar.close()

    # Stage 2: everything, on conversations; the heads stay on as an auxiliary loss so the tower keeps its skills.
    captured: dict[str, Any] = {}
    hook = tower.register_forward_hook(lambda _m, _i, out: captured.__setitem__("hidden", out.hidden_states[-1]))
    tower_ids = {id(p) for p in tower.parameters()}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    opt = torch.optim.AdamW(
        [
            {"params": list(tower.parameters()), "scale": 0.3},
            {"params": list(heads.net.parameters()), "scale": 0.3},
            {"params": rest, "scale": 1.0},
        ],
        lr=recipe.lr,
        weight_decay=0.01,
        betas=(0.9, 0.98),
    )
    bar = tqdm(range(recipe.steps), desc="llava", disable=not progress or cut_short)
    for step in bar:
        if cut_short or time.monotonic() > deadline:
            cut_short = True
            break
        for group in opt.param_groups:
            group["lr"] = recipe.lr * group["scale"] * _schedule(step, recipe.steps)
        idx = torch.randint(0, len(scenes), (recipe.batch,), generator=gen)
        rows = [encode_conversation(tokenizer, messages(random_sample(rng, scenes[i]).turns)) for i in idx.tolist()]
        ids, mask, labels = collate(tokenizer, rows)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[idx].float(), use_cache=False)
        lm_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        aux_loss, accs = heads.loss(captured["hidden"], head_labels[idx])
        loss = lm_loss + recipe.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *heads.net.parameters()], 1.0)
        opt.step()
        bar.set_postfix(loss=f"{lm_loss.item():.4f}", aux=f"{aux_loss.item():.3f}")
    bar.close()
    hook.remove()
    if cut_short:
        log.warning("training stopped at the %.1f minute budget before the recipe finished", minutes_budget)
        print(f"warning: stopped at the {minutes_budget:g} minute budget; the model may answer worse")
    return save(model, processor, tokenizer, Path(dir), time.monotonic() - started)


def save(model: Any, processor: Any, tokenizer: Any, path: Path, seconds: float) -> Path:
    """Save in HF format with float16 weights (half the size; loading upcasts on CPU)."""
    import torch

    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(path)
    model.to(torch.float32)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    log.info("saved the demo model at %s after %.0f s", path, seconds)
    return path


def train_demo_model_command(args: argparse.Namespace) -> int:
    """`llava-serve train-demo-model DIR [--seed N] [--max-minutes M]`: train and save the demo model in DIR."""
    started = time.monotonic()
    path = train(Path(args.dir), seed=args.seed, minutes_budget=args.max_minutes, progress=True)
    print(f"demo LLaVA trained in {(time.monotonic() - started) / 60:.1f} min, saved in {path}")
    return 0
