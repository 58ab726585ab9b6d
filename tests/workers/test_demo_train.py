import argparse

import torch
from safetensors.torch import load_file

from workers.demo.data import messages, random_sample
from workers.demo.train import (
    IMAGE_SIZE,
    IMAGE_TOKENS,
    Recipe,
    build_processor,
    build_tokenizer,
    encode_conversation,
    train,
    train_demo_model_command,
)
from workers.model import load_model

TINY = Recipe(images=48, vision_steps=2, vision_batch=8, steps=2, batch=4)


def test_labels_cover_only_the_answers_and_their_eos():
    import random

    tokenizer = build_tokenizer()
    sample = random_sample(random.Random(5))
    while len(sample.turns) < 2:
        sample = random_sample(random.Random(len(sample.turns) + 6))
    ids, labels = encode_conversation(tokenizer, messages(sample.turns))
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == IMAGE_TOKENS
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    kept = tokenizer.decode([t for t in labels if t != -100])
    assert kept == "".join(f" {t.answer}</s>" for t in sample.turns)


def test_processor_resizes_any_image_to_the_tower_size_without_cropping():
    from PIL import Image

    processor = build_processor(build_tokenizer())
    pixels = processor.image_processor(images=[Image.new("RGB", (1024, 300), "red")], return_tensors="pt")
    assert pixels["pixel_values"].shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)


def test_train_is_deterministic_and_loads_through_the_real_path(tmp_path):
    torch.set_num_threads(1)
    first = train(tmp_path / "a", seed=3, minutes_budget=5, progress=False, recipe=TINY)
    second = train(tmp_path / "b", seed=3, minutes_budget=5, progress=False, recipe=TINY)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_model(str(first), device="cpu", dtype="float32")
    assert loaded.image_token_id == loaded.tokenizer.convert_tokens_to_ids("<image>")
    assert loaded.chat_template


def test_command_trains_into_dir(tmp_path, monkeypatch, capsys):
    import workers.demo.train as module

    monkeypatch.setattr(module, "Recipe", lambda: TINY)
    args = argparse.Namespace(dir=str(tmp_path / "m"), seed=0, max_minutes=5.0)
    assert train_demo_model_command(args) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert "saved in" in capsys.readouterr().out


def test_head_weights_scale_each_attribute_loss():
    from workers.demo.train import AttributeHeads

    torch.manual_seed(0)
    features = torch.randn(6, 5, 16)
    labels = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 0], [-100, -100, -100, 2]] * 2)
    plain = AttributeHeads(16)
    loss, accs = plain.loss(features, labels)
    weighted = AttributeHeads(16, (1.0, 0.0, 1.0, 1.0))
    weighted.net.load_state_dict(plain.net.state_dict())
    features.requires_grad_(True)
    w_loss, _ = weighted.loss(features, labels)
    assert len(accs) == 4 and loss.item() > 0 and w_loss.item() > 0
    # With shape weighted 0, the shape logits get no gradient.
    w_loss.backward()
    shape_rows = slice(6, 9)  # colour (6 outputs) first, then shape (3)
    assert weighted.cls[1].weight.grad[shape_rows].abs().sum() == 0
    assert weighted.cls[1].weight.grad[:6].abs().sum() > 0


def llava_page_template(model_name: str) -> str:
    """The template LLaVA's own Gradio page picks for a model name on the first round (its `http_bot` rules)."""
    name = model_name.lower()
    if "llava" not in name:
        return "vicuna_v1"
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name or "mixtral" in name:
        return "mistral_instruct"
    if "llava-v1.6-34b" in name:
        return "chatml_direct"
    tagged = "mmtag" in name or ("plain" in name and "finetune" not in name)
    if "v1" in name:
        return "v1_mmtag" if tagged else "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "v0_mmtag" if tagged else "llava_v0"


def test_the_demo_models_name_makes_llavas_own_page_use_the_template_it_was_trained_with():
    from workers.demo.train import DEMO_MODEL_NAME, demo_model_path

    assert llava_page_template(DEMO_MODEL_NAME) == "llava_v1"
    # The trained chat template is LLaVA-1.5's (llava_v1): "USER: <image>\n... ASSISTANT:".
    template = (demo_model_path() / "chat_template.jinja").read_text()
    assert "USER: " in template and "ASSISTANT:" in template
