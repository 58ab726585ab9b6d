import json

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.workers.tiny_llava import tiny_model_path
from workers.tiny_model import TINY_MODEL_NAME, build_tiny_model, ensure_tiny_model, tiny_model_command


def test_loads_back_through_auto_classes():
    path = tiny_model_path()
    assert path.name == TINY_MODEL_NAME
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>USER: <image>\nWhat is this? ASSISTANT:"
    assert processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
    inputs = processor(images=[Image.new("RGB", (50, 40), "red")], text=prompt, return_tensors="pt")
    image_token_id = model.config.image_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token_id
    assert int((inputs["input_ids"] == image_token_id).sum()) == 16  # (32 / 8) ** 2
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    tokenizer = processor.tokenizer
    for token in ("<s>", "</s>", "<pad>", "<image>"):
        assert token in tokenizer.all_special_tokens or token in tokenizer.get_added_vocab()
    assert json.loads((path / "config.json").read_text())["text_config"]["max_position_embeddings"] == 512


def test_same_seed_same_weights(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    ma = AutoModelForImageTextToText.from_pretrained(a)
    mb = AutoModelForImageTextToText.from_pretrained(b)
    for (name, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_ensure_builds_once_and_reuses(tmp_path):
    first = ensure_tiny_model(tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    again = ensure_tiny_model(tmp_path)
    assert again == first == tmp_path / "tiny-llava"
    assert (again / "config.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llava"]  # no temp dir left


def test_command_builds_into_dir(tmp_path, capsys):
    assert tiny_model_command(tmp_path / "tiny-llava") == 0
    assert (tmp_path / "tiny-llava" / "model.safetensors").exists()
    assert "tiny-llava" in capsys.readouterr().out
