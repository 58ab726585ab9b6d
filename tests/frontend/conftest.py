"""Fixtures for UI tests: the real controller app under uvicorn in a thread, and a worker with the scripted engine.

The worker is `workers.worker.Worker` driving `workers.scripted.ScriptedEngine`: a scripted stand-in for a model
(deterministic words at a set pace), not a model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
import redis
import uvicorn
from PIL import Image

from broker.app import create_app
from broker.context import StreamTimings
from contract import keys
from contract.client import ControllerClient
from contract.messages import ChatMessage, GenerateRequest, ImageMode, TextPart, WorkerInfo
from infra.embedded_redis import free_port
from infra.settings import ControllerSettings, WorkerSettings
from workers.scripted import ScriptedEngine
from workers.worker import Worker

MODEL = "scripted-model"


class RecordingClient(ControllerClient):
    """The real client, keeping every generate request it sent."""

    def __init__(self, url: str, api_key: str | None = None):
        super().__init__(url, api_key=api_key)
        self.sent: list[GenerateRequest] = []
        self.end_users: list[str | None] = []

    def generate(self, request, end_user=None):
        self.sent.append(request)
        self.end_users.append(end_user)
        return super().generate(request, end_user=end_user)


def session(name: str = "s1"):
    """What the handlers read of a `gr.Request`."""
    return SimpleNamespace(session_hash=name, query_params={})


def chat(handlers, conv, text: str, files=(), model=MODEL, max_tokens=6, name="s1") -> list[tuple]:
    """Send a message as the page does; returns every (state, chatbot, *buttons) the reply yielded."""
    out = handlers.add_message(conv, {"text": text, "files": list(files)}, "pad")
    return list(handlers.generate(out[0], model, 0.2, 0.7, max_tokens, session(name)))


def picture(tmp_path, name="p.png", colour=(10, 200, 10)) -> str:
    path = tmp_path / name
    Image.new("RGB", (64, 32), colour).save(path)
    return str(path)


def as_parts(request: GenerateRequest) -> GenerateRequest:
    """`request` with plain-string contents as one text part, as the controller reads them (and replay builds)."""
    messages = [
        ChatMessage(role=m.role, content=[TextPart(text=m.content)]) if isinstance(m.content, str) else m
        for m in request.messages
    ]
    return request.model_copy(update={"messages": messages})


class ServerThread:
    """A uvicorn server in a daemon thread; `stop()` shuts it down and joins."""

    def __init__(self, app, port: int) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the controller did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextmanager
def running_controller(redis_url: str, **settings: object) -> Iterator[str]:
    """The controller app under uvicorn on a free port with `settings`; yields its URL."""
    full = ControllerSettings(redis_url=redis_url, queued_update_interval_s=0.1, **settings)
    app = create_app(full, timings=StreamTimings(stall_check_s=0.5, no_worker_timeout_s=30.0), run_sweeper=False)
    server = ServerThread(app, free_port()).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def controller_url(redis_client: redis.Redis, redis_url: str) -> Iterator[str]:
    """The controller on a free port over the emptied test database (max_queue 2, so 429 is reachable)."""
    with running_controller(redis_url, max_queue=2) as url:
        yield url


class WorkerThread:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, daemon=True)

    def stop(self) -> None:
        self.worker.stop(now=True)
        self.thread.join(15)


def start_worker(redis_url: str, image_modes: list[str] | None = None, **engine_kwargs) -> WorkerThread:
    """A scripted worker of MODEL in a thread (supporting `image_modes`, default all), once it has registered."""
    from infra.redis import connect

    engine_kwargs.setdefault("step_delay_s", 0.01)
    settings = WorkerSettings(model_path=MODEL, worker_id=f"ui-test-{time.monotonic_ns()}", drain_timeout_s=2.0)
    if image_modes is not None:
        settings = settings.model_copy(update={"image_modes": [ImageMode(m) for m in image_modes]})
    worker = Worker(settings, ScriptedEngine(**engine_kwargs), connect(redis_url), model_name=MODEL)
    running = WorkerThread(worker)
    running.thread.start()
    client = connect(redis_url)
    deadline = time.monotonic() + 10
    while not client.exists(keys.worker(worker.worker_id)):
        if time.monotonic() > deadline:
            raise RuntimeError("the scripted worker did not register")
        time.sleep(0.02)
    client.close()
    return running


@pytest.fixture
def scripted_worker(controller_url: str, redis_url: str) -> Iterator[WorkerThread]:
    """A live worker serving MODEL with the scripted engine (a stand-in, not a model)."""
    running = start_worker(redis_url)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def idle_worker(redis_client: redis.Redis) -> str:
    """A worker record that is alive but never claims: jobs stay queued. Returns its model name."""
    info = WorkerInfo(
        worker_id="idle",
        models=["idle-model"],
        max_batch=1,
        device="cpu",
        host="test",
        pid=0,
        software_version="test",
        started_at=time.time(),
        heartbeat_at=time.time(),
    )
    redis_client.sadd(keys.workers(), "idle")
    redis_client.set(keys.worker("idle"), info.model_dump_json(), ex=120)
    return "idle-model"


@contextmanager
def launched_ui(controller_url: str, model_list_refresh_s: float = 10.0, **settings: object) -> Iterator[str]:
    """The Gradio UI of `frontend.app`, launched in-process on a free port against a controller."""
    from frontend.app import build_demo, launch
    from infra.settings import WebSettings

    web_settings = WebSettings(controller_url=controller_url, port=free_port(), **settings)
    demo = build_demo(web_settings, model_list_refresh_s=model_list_refresh_s)
    launch(demo, web_settings, block=False)
    try:
        yield f"http://127.0.0.1:{web_settings.port}"
    finally:
        demo.close()


@pytest.fixture
def web_url(controller_url: str, scripted_worker: WorkerThread) -> Iterator[str]:
    with launched_ui(controller_url, concurrency_limit=4) as url:
        yield url


def text_of(message: dict) -> str:
    """A Chatbot message's text as the user reads it (without the marker that hides a reply's thumbs)."""
    from frontend.conversation import NO_VOTE

    return message["content"].removeprefix(NO_VOTE)
