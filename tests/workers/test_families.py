"""Every served family gives `generate`'s tokens through the engine: batched with other jobs, with a job joining
mid-batch, for images of four sizes, two images in one turn, a multi-turn chat and a text-only turn."""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from contract.errors import InvalidRequest
from contract.messages import JobImage, JobMessage, JobText, SamplingParams
from workers.completion import run_to_completion
from workers.engine import EngineImage, EngineJob, TransformersEngine
from workers.families import FAMILIES, MROPE, UnsupportedFamily, family_of
from workers.positions import prompt_positions
from workers.tiny_families import BUILDERS, family_loaded, model_type

NEW_TOKENS = 12
SIZES = [(20, 20), (60, 40), (30, 70), (90, 90)]


def image(i: int, size: tuple[int, int]) -> EngineImage:
    gen = torch.Generator().manual_seed(i)
    pixels = (torch.rand((size[1], size[0], 3), generator=gen) * 255).to(torch.uint8).numpy()
    return EngineImage(f"digest-{i}-{size[0]}x{size[1]}", Image.fromarray(pixels))


def user(*parts: object) -> JobMessage:
    return JobMessage(
        role="user",
        content=[JobImage(digest=p.digest) if isinstance(p, EngineImage) else JobText(text=p) for p in parts],
    )


def conversations(family: str = "") -> dict[str, tuple[list[JobMessage], list[EngineImage]]]:
    images = [image(i, size) for i, size in enumerate(SIZES)]
    two = [image(10, (40, 30)), image(11, (30, 50))]
    chats = {f"size{i}": ([user(img, "What is in this picture?")], [img]) for i, img in enumerate(images)}
    chats["two"] = ([user(two[0], "and", two[1], "compare the two images")], two)
    chats["turns"] = (
        [
            user(images[1], "Describe the image."),
            JobMessage(role="assistant", content=[JobText(text="A small house and a tree.")]),
            user("And what colour is the car?"),
        ],
        [images[1]],
    )
    if not (family and FAMILIES[model_type(family)].needs_images):
        chats["text"] = ([user("The quick brown fox jumps over the lazy dog. Why?")], [])
    return chats


def job(name: str, messages: list[JobMessage], images: list[EngineImage]) -> EngineJob:
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
    return EngineJob(name, params, messages=messages, images=images)


def processor_inputs(loaded, messages: list[JobMessage], images: list[EngineImage]) -> dict[str, torch.Tensor]:
    """The conversation's model inputs as the processor's own chat template builds them."""
    by_digest = {img.digest: img.image for img in images}
    chat = [
        {
            "role": m.role,
            "content": [
                {"type": "image", "image": by_digest[p.digest]}
                if isinstance(p, JobImage)
                else {"type": "text", "text": p.text}
                for p in m.content
            ],
        }
        for m in messages
    ]
    inputs = loaded.processor.apply_chat_template(
        chat,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        chat_template=loaded.chat_template,
    )
    inputs.pop("labels", None)
    return inputs


def reference(loaded, messages: list[JobMessage], images: list[EngineImage]) -> list[int]:
    """`generate`'s greedy tokens for the conversation, its inputs built by the processor's own chat template."""
    inputs = processor_inputs(loaded, messages, images)
    out = loaded.model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=loaded.pad_token_id
    )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@functools.cache
def expected(family: str, name: str) -> list[int]:
    """`reference` of conversation `name` up to its first EOS (where the engine stops), computed once per session."""
    loaded = family_loaded(family)
    tokens = reference(loaded, *conversations(family)[name])
    ends = [i for i, t in enumerate(tokens) if t in loaded.eos_token_ids]
    return tokens[: ends[0] + 1] if ends else tokens


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_family_matches_generate_batched_and_joining(family):
    loaded = family_loaded(family)
    chats = conversations(family)
    engine = TransformersEngine(loaded, max_batch=8)
    late = "turns"
    tokens: dict[str, list[int]] = {name: [] for name in chats}
    for name, chat in chats.items():
        if name != late:
            engine.add(engine.prepare(job(name, *chat)))
    for step in range(200):
        if step == 3:
            engine.add(engine.prepare(job(late, *chats[late])))
        for update in engine.step():
            tokens[update.job_id] += update.token_ids
        if step > 3 and not engine.has_work():
            break
    assert not engine.has_work()
    for name in chats:
        assert tokens[name] == expected(family, name), f"{family}: {name}"


@pytest.mark.parametrize("family", sorted(f for f in BUILDERS if FAMILIES[model_type(f)].compiled))
def test_compiled_decode_matches_generate(family):
    loaded = family_loaded(family)
    chats = conversations(family)
    engine = TransformersEngine(loaded, max_batch=8, compile=True, compile_backend="eager")
    assert engine.compiled
    jobs = [job(name, *chat) for name, chat in chats.items()]
    out = run_to_completion(engine, jobs)
    for name in chats:
        assert out[name].token_ids == expected(family, name), f"{family}: {name}"


def test_a_family_that_needs_images_refuses_a_text_only_prompt():
    engine = TransformersEngine(family_loaded("paligemma"))
    messages, images = conversations()["text"]
    with pytest.raises(InvalidRequest, match="paligemma needs at least one image"):
        engine.prepare(job("t", messages, images))


def test_families_the_compiled_step_cannot_take_run_eager(caplog):
    loaded = family_loaded("gemma3")
    engine = TransformersEngine(loaded, compile=True, compile_backend="eager")
    assert not engine.compiled
    assert "gemma3" in caplog.text and "running eager" in caplog.text


def greedy_with_positions(loaded, ids, positions, extras, steps: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens, the prompt (with its images) at `positions` ([1, prompt], or [3, 1, prompt] for M-RoPE) and
    each new token one position further, through
    the model's KV cache: a generated token is never read as an image placeholder again."""
    from transformers import DynamicCache

    cache = DynamicCache()
    inputs = {"input_ids": ids, "position_ids": positions, **extras}
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = loaded.model(**inputs, **{loaded.cache_kwarg: cache}, use_cache=True).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        positions = positions[..., -1:] + 1
        per_token = {k: v[:, -1:] for k, v in extras.items() if k in loaded.family.per_token}
        inputs = {"input_ids": torch.tensor([[token]]), "position_ids": positions, **per_token}
    return out


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_a_position_bug_changes_the_greedy_text(family):
    """The checkpoints are sharp enough: positions off by a few (as when tokens are miscounted) change the greedy
    text of most conversations."""
    loaded = family_loaded(family)
    engine = TransformersEngine(loaded)
    changed = 0
    chats = conversations(family)
    for name, (messages, images) in chats.items():
        prepared = engine.prepare(job("x", messages, images))
        extras = {k: v[None] if k in loaded.family.per_token else v for k, v in prepared.image_inputs.items()}
        ids = prepared.input_ids[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extras}
        right, _ = prompt_positions(loaded.model, loaded.family.positions, inputs)
        wrong = right.clone()
        wrong[..., -6:] -= 3
        served = greedy_with_positions(loaded, ids, right, extras)
        reference = expected(family, name)  # ends at the first EOS, where the engine stops
        assert served[: len(reference)] == reference[: len(served)]
        changed += served != greedy_with_positions(loaded, ids, wrong, extras)
    assert changed > len(chats) // 2


@pytest.mark.parametrize("family", sorted(f for f in BUILDERS if FAMILIES[model_type(f)].positions == MROPE))
def test_a_decode_step_without_the_rope_delta_changes_the_greedy_text(family, monkeypatch):
    """M-RoPE: decoding at the cache position without the row's rope delta (prefill still right) changes the text of
    every conversation whose delta is not 0, so the batched test above would catch a delta that is lost or sits on
    the wrong row."""
    import workers.engine

    loaded = family_loaded(family)
    chats = conversations(family)
    engine = TransformersEngine(loaded, max_batch=8)
    deltas = {}
    for name, (messages, images) in chats.items():
        prepared = engine.prepare(job(name, messages, images))
        extras = {k: v[None] if k in loaded.family.per_token else v for k, v in prepared.image_inputs.items()}
        inputs = {"input_ids": prepared.input_ids[None], "attention_mask": torch.ones_like(prepared.input_ids[None])}
        deltas[name] = int(prompt_positions(loaded.model, MROPE, {**inputs, **extras})[1][0])

    def without_deltas(model, scheme, inputs):
        positions, rope_deltas = prompt_positions(model, scheme, inputs)
        return positions, torch.zeros_like(rope_deltas)

    monkeypatch.setattr(workers.engine, "prompt_positions", without_deltas)
    out = run_to_completion(engine, [job(name, *chat) for name, chat in chats.items()])
    shifted = [name for name in chats if deltas[name] != 0]
    assert len(shifted) > len(chats) // 2
    for name in chats:
        assert out[name].token_ids[0] == expected(family, name)[0], f"{family}: {name} prefill"
        assert (out[name].token_ids != expected(family, name)) == (name in shifted), f"{family}: {name}"


def test_unsupported_families_are_refused_with_the_reason():
    class Config:
        model_type = "some_new_vlm"

    with pytest.raises(UnsupportedFamily, match="'some_new_vlm' is not served: not a family this worker knows"):
        family_of(Config())


def test_the_worker_refuses_an_unsupported_checkpoint_before_loading_it(tmp_path):
    from transformers import Blip2Config

    from workers.model import load_model

    Blip2Config().save_pretrained(tmp_path)
    with pytest.raises(InvalidRequest, match="'blip-2' is not served: not a family this worker knows"):
        load_model(str(tmp_path), device="cpu")


def test_a_wire_prompt_gets_the_familys_image_placeholder():
    """LLaVA clients send prompts templated with `<image>`; Gemma 3's processor expects `<start_of_image>`."""
    loaded = family_loaded("gemma3")
    img = image(0, (40, 40))
    params = SamplingParams(temperature=0, max_new_tokens=4)
    prepared = TransformersEngine(loaded).prepare(
        EngineJob("w", params, prompt="USER: <image>\nhi ASSISTANT:", images=[img])
    )
    direct = loaded.processor(text=["USER: <start_of_image>\nhi ASSISTANT:"], images=[img.image], return_tensors="pt")
    assert prepared.input_ids.tolist() == direct["input_ids"][0].tolist()
    assert int((prepared.input_ids == loaded.model.config.image_token_index).sum()) == 4


@pytest.mark.parametrize("family", sorted(f for f in BUILDERS if FAMILIES[model_type(f)].positions == MROPE))
def test_a_wire_prompt_gets_qwens_vision_markers_around_the_image(family):
    """Qwen's processor expands `<|image_pad|>` only; its chat template writes the markers around it."""
    loaded = family_loaded(family)
    img = image(0, (40, 40))
    params = SamplingParams(temperature=0, max_new_tokens=4)
    prepared = TransformersEngine(loaded).prepare(
        EngineJob("w", params, prompt="USER: <image>\nhi ASSISTANT:", images=[img])
    )
    text = "USER: <|vision_start|><|image_pad|><|vision_end|>\nhi ASSISTANT:"
    direct = loaded.processor(text=[text], images=[img.image], return_tensors="pt")
    assert prepared.input_ids.tolist() == direct["input_ids"][0].tolist()


@pytest.mark.parametrize("family", sorted(f for f in BUILDERS if FAMILIES[model_type(f)].images_stack))
def test_cached_images_give_the_processors_own_inputs(family):
    """Families whose image outputs stack per image reuse one image's tensors by digest: a job whose images all come
    from the cache gets what the processor gives for the whole prompt."""
    loaded = family_loaded(family)
    engine = TransformersEngine(loaded)
    messages, images = conversations(family)["two"]
    engine.prepare(job("first", messages, images))
    again = engine.prepare(job("again", messages, images))
    assert engine.images.hits == len(images)
    direct = processor_inputs(loaded, messages, images)
    assert again.input_ids.tolist() == direct["input_ids"][0].tolist()
    assert set(again.image_inputs) == set(direct) - {"input_ids", "attention_mask"}
    for key, value in again.image_inputs.items():
        value = value[None] if key in loaded.family.per_token else value
        assert torch.equal(value, direct[key]), f"{family}: {key}"
