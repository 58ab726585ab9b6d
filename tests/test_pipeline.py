"""The whole pipeline as real processes: controller + workers + the tiny LLaVA, through the CLI, on real Redis."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from cli.processes import Proc, start_controller, start_worker, wait_for_workers
from contract import keys
from contract.client import ControllerClient
from contract.errors import ModelNotFound
from contract.messages import GenerateRequest
from infra.redis import connect

pytestmark = pytest.mark.pipeline
MODEL = "tiny-llava"


def png_data_url(color: str = "red", size: int = 96) -> str:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(text: str, *, image: bool = True, **params: object) -> GenerateRequest:
    content: list[dict] = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url()}})
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_new_tokens": 12, **params}  # fmt: skip
    return GenerateRequest.model_validate(body)


@pytest.fixture(scope="module")
def system(redis_url: str, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A controller and two workers (max batch 4) on the tiny model."""
    connect(redis_url).flushdb()
    logs = tmp_path_factory.mktemp("logs")
    controller, url = start_controller(redis_url, logs)
    workers = [
        start_worker(
            redis_url, logs, f"worker-{i}", "--model-path", str(tiny_model_path), "--device", "cpu", "--max-batch", "4"
        )  # fmt: skip
        for i in range(2)
    ]
    procs: list[Proc] = [controller, *workers]
    try:
        wait_for_workers(url, MODEL, 2, procs)
        yield {"url": url, "procs": procs, "redis_url": redis_url}
    finally:
        for proc in reversed(procs):
            proc.stop()


def collect(url: str, request: GenerateRequest) -> list:
    client = ControllerClient(url)
    try:
        return list(client.generate(request))
    finally:
        client.close()


def test_streamed_answer_about_an_image(system: dict) -> None:
    events = collect(system["url"], ask("What is in this picture?"))
    kinds = [e.type for e in events]
    assert kinds[-1] == "done", events
    assert set(kinds) <= {"queued", "token", "done"}
    done = events[-1]
    streamed = "".join(e.text for e in events if e.type == "token")
    assert done.text == streamed
    assert done.finish_reason in {"length", "eos", "stop"}
    assert done.usage.prompt_tokens > 0
    assert 1 <= done.usage.completion_tokens <= 12
    # the job record outlives the stream
    job = httpx.get(f"{system['url']}/api/v1/jobs/{done.job_id}", timeout=5).json()
    assert job["status"] == "finished"
    assert job["outcome"]["text"] == streamed
    assert job["outcome"]["usage"] == done.usage.model_dump()


def test_greedy_answers_repeat_and_concurrent_streams_all_finish(system: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    first = collect(system["url"], ask("Describe the image."))[-1].text
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: collect(system["url"], ask("Describe the image.")), range(6)))
    assert all(r[-1].type == "done" for r in results)
    assert all(r[-1].text == first for r in results)  # greedy: batching never changes the answer


def test_text_only_and_multi_turn(system: dict) -> None:
    request = GenerateRequest.model_validate({
        "model": MODEL, "temperature": 0, "max_new_tokens": 8,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url("blue")}},
                                         {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And what shape is it?"},
        ],
    })  # fmt: skip
    assert collect(system["url"], request)[-1].type == "done"
    assert collect(system["url"], ask("Hello there", image=False))[-1].type == "done"


def test_prompt_longer_than_context_names_both_counts(system: dict) -> None:
    events = collect(system["url"], ask("tell me " * 2000, image=False))
    assert events[-1].type == "error"
    error = events[-1]
    assert error.code == "context_length_exceeded"
    assert any(ch.isdigit() for ch in error.message)


def test_unknown_model_lists_the_models_there_are(system: dict) -> None:
    request = ask("hi").model_copy(update={"model": "no-such-model"})
    with pytest.raises(ModelNotFound) as err:
        collect(system["url"], request)
    assert err.value.status_code == 404
    assert MODEL in err.value.message


def test_llava_client_wire_format(system: dict) -> None:
    url = system["url"]
    assert MODEL in httpx.post(f"{url}/list_models", timeout=5).json()["models"]
    address = httpx.post(f"{url}/get_worker_address", json={"model": MODEL}, timeout=5).json()["address"]
    assert address.rstrip("/") == url
    image_b64 = png_data_url().split(",", 1)[1]
    prompt = "USER: <image>\nWhat is shown? ASSISTANT:"
    body = {"model": MODEL, "prompt": prompt, "images": [image_b64], "temperature": 0, "top_p": 1.0,
            "max_new_tokens": 8, "stop": "</s>"}  # fmt: skip
    with httpx.stream("POST", f"{address}/worker_generate_stream", json=body, timeout=60) as response:
        raw = b"".join(response.iter_bytes())
    chunks = [json.loads(part) for part in raw.split(b"\0") if part]
    assert chunks, raw
    assert all(c["error_code"] == 0 for c in chunks), chunks
    assert chunks[-1]["text"].startswith(prompt)
    status = httpx.post(f"{url}/worker_get_status", timeout=5).json()
    assert MODEL in status["model_names"]


def test_no_keys_left_behind_by_a_finished_job(system: dict) -> None:
    redis = connect(system["redis_url"])
    job_id = collect(system["url"], ask("What is it?"))[-1].job_id
    assert redis.exists(f"rq:job:{job_id}")
    assert 0 < redis.ttl(f"rq:job:{job_id}") <= 600
    assert not redis.exists(keys.cancel(job_id))
    for worker_id in redis.smembers(keys.workers()):
        assert not redis.hexists(keys.worker_jobs(worker_id.decode()), job_id)
    assert redis.llen(f"rq:queue:{keys.queue_name(MODEL)}") == 0


def test_compiled_worker_answers_as_the_eager_one(system: dict, tiny_model_path: Path, tmp_path: Path) -> None:
    # The --compile path through the CLI: slots, warm-up before registering, the compiled step serving requests.
    # The `eager` backend keeps inductor's code generation out of the test; the engine tests cover the rest.
    name = "tiny-compiled"
    worker = start_worker(system["redis_url"], tmp_path, "compiled", "--model-path", str(tiny_model_path),
                          "--model-name", name, "--device", "cpu", "--max-batch", "4", "--compile",
                          "--compile-backend", "eager")  # fmt: skip
    try:
        wait_for_workers(system["url"], name, 1, [worker])
        assert "compiled decode step warmed up" in worker.log()
        for text in ("What is in this picture?", "Name the colour."):
            eager = collect(system["url"], ask(text))[-1]
            compiled = collect(system["url"], ask(text, model=name))[-1]
            assert eager.type == compiled.type == "done", (eager, compiled)
            assert compiled.text == eager.text
            assert compiled.usage == eager.usage
    finally:
        worker.stop()


def test_legacy_completion_of_a_raw_prompt_by_the_real_model(system: dict) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{system['url']}/v1", api_key="unused", max_retries=0)
    prompt = "USER: Say something about circles. ASSISTANT:"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in {"length", "stop"}
    assert 0 < whole.usage.completion_tokens <= 6 and whole.usage.prompt_tokens > 0
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == whole.choices[0].text
