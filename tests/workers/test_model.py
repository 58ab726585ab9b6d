import json

import pytest
import torch

from contract.errors import InvalidRequest
from tests.workers.tiny_llava import tiny_loaded, tiny_model_path
from workers.model import load_model, resolve_device, resolve_dtype
from workers.tiny_model import build_tiny_model


def test_loaded_fields():
    loaded = tiny_loaded()
    assert loaded.device == "cpu"
    assert loaded.dtype == torch.float32
    assert loaded.context_length == 512
    assert loaded.eos_token_ids == {loaded.tokenizer.eos_token_id}
    assert loaded.image_token == "<image>"
    assert loaded.image_token_id == loaded.tokenizer.convert_tokens_to_ids("<image>")
    assert loaded.name == "tiny-llava"
    assert loaded.chat_template
    assert not loaded.model.training


def test_missing_path_names_it(tmp_path):
    with pytest.raises(InvalidRequest, match="nowhere"):
        load_model(str(tmp_path / "nowhere"))


def test_checkpoint_without_chat_template(tmp_path):
    path = build_tiny_model(tmp_path / "no-template")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        file = path / name
        if file.exists():
            data = json.loads(file.read_text())
            data.pop("chat_template", None)
            file.write_text(json.dumps(data))
    with pytest.raises(InvalidRequest, match="chat template"):
        load_model(str(path))


def test_dtype_and_device_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda:0")


def test_load_bfloat16_on_cpu():
    loaded = load_model(str(tiny_model_path()), device="cpu", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_cache_kwarg_follows_the_forward_signature():
    from workers.model import cache_kwarg

    class Recent:
        def forward(self, input_ids=None, cache=None, past_key_values=None): ...

    class Earlier:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    assert cache_kwarg(Recent()) == "cache"
    assert cache_kwarg(Earlier()) == "past_key_values"
