import pytest
import torch

from contract.errors import InvalidRequest
from contract.messages import JobImage, JobMessage, JobText
from tests.workers.tiny_llava import tiny_loaded
from workers.preprocess import ImageCache, ProcessedImage, check_prompt, render_messages, stack_image_tensors


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


def test_render_multi_turn_with_images(loaded):
    messages = [
        JobMessage(role="system", content=[JobText(text="Be brief.")]),
        JobMessage(role="user", content=[JobImage(digest="d1"), JobText(text="What is it?")]),
        JobMessage(role="assistant", content=[JobText(text="A square.")]),
        JobMessage(role="user", content=[JobText(text="Colour?")]),
    ]
    prompt = render_messages(loaded.processor, messages, "<image>", 1)
    assert prompt == "<s>Be brief. USER: <image>\nWhat is it? ASSISTANT: A square.</s>USER: Colour? ASSISTANT:"


def test_render_rejects_mismatch_and_literal_token(loaded):
    user = JobMessage(role="user", content=[JobImage(digest="d1"), JobText(text="hi")])
    with pytest.raises(InvalidRequest, match="1 image parts but 0 images"):
        render_messages(loaded.processor, [user], "<image>", 0)
    with pytest.raises(InvalidRequest, match=r"messages\[0\]"):
        render_messages(loaded.processor, [JobMessage(role="user", content=[JobText(text="<image>")])], "<image>", 0)
    with pytest.raises(InvalidRequest, match="empty"):
        render_messages(loaded.processor, [], "<image>", 0)
    check_prompt("USER: <image> hi", "<image>", 1)
    with pytest.raises(InvalidRequest, match="prompt has 0"):
        check_prompt("USER: hi", "<image>", 1)


def test_image_cache_is_an_lru_by_digest():
    cache = ImageCache(capacity=2)
    calls = []

    def compute(name):
        def run():
            calls.append(name)
            return {"pixel_values": torch.full((1, 3, 2, 2), float(len(calls)))}

        return run

    first = cache.get("a", compute("a"))
    assert cache.get("a", compute("never")) is first  # the digest decides
    cache.get("b", compute("b"))
    cache.get("a", compute("never"))
    cache.get("c", compute("c"))  # evicts b, the least recently used
    assert len(cache) == 2 and (cache.hits, cache.misses) == (2, 3)
    cache.get("b", compute("b"))
    assert cache.misses == 4 and calls == ["a", "b", "c", "b"]


def test_stack_pads_ragged_patch_counts():
    a = ProcessedImage({"pixel_values": torch.ones(1, 2, 3)})
    b = ProcessedImage({"pixel_values": torch.ones(1, 5, 3)})
    stacked = stack_image_tensors([a, b])["pixel_values"]
    assert stacked.shape == (2, 5, 3) and stacked[0, 2:].abs().sum() == 0
    assert stack_image_tensors([]) == {}
