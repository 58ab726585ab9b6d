"""End to end: a controller and a worker serving the shipped demo model answer about a drawn image correctly."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest

from cli.processes import start_controller, start_worker, wait_for_workers
from contract.client import ControllerClient
from contract.messages import GenerateRequest
from infra.redis import connect
from workers.demo.shapes import draw_scene, single_shape_scene
from workers.demo.train import DEMO_MODEL_NAME, demo_model_path

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def system(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    connect(redis_url).flushdb()
    logs = tmp_path_factory.mktemp("demo-logs")
    controller, url = start_controller(redis_url, logs)
    worker = start_worker(redis_url, logs, "demo-worker", "--model-path", str(demo_model_path()),
                          "--model-name", DEMO_MODEL_NAME, "--device", "cpu")  # fmt: skip
    try:
        wait_for_workers(url, DEMO_MODEL_NAME, 1, [controller, worker])
        yield url
    finally:
        worker.stop()
        controller.stop()


def data_url(image, fmt: str) -> str:  # noqa: ANN001
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(url: str, messages: list[dict]) -> str:
    body = GenerateRequest.model_validate(
        {"model": DEMO_MODEL_NAME, "messages": messages, "temperature": 0, "max_new_tokens": 16}
    )
    client = ControllerClient(url)
    try:
        events = list(client.generate(body))
    finally:
        client.close()
    assert events[-1].type == "done", events
    return events[-1].text.strip()


def test_the_served_demo_model_sees_colour_and_shape(system: str) -> None:
    import random

    scene = single_shape_scene(random.Random(11), colour="red", kind="triangle", position="right")
    image = data_url(draw_scene(scene, 400, 300), "JPEG")
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": "What colour is the shape?"}]}]  # fmt: skip
    colour = ask(system, first)
    assert "red" in colour.lower()
    follow = [*first, {"role": "assistant", "content": colour}, {"role": "user", "content": "And what shape is it?"}]
    assert "triangle" in ask(system, follow).lower()
