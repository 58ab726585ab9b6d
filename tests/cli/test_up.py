"""`llava-serve up`: one command brings up Redis, the controller, a worker and the UI; Ctrl-C leaves nothing."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cli.processes import ROOT, wait_until
from contract.client import ControllerClient
from contract.messages import GenerateRequest
from frontend.app import EXAMPLES_DIR
from infra.embedded_redis import free_port

pytestmark = pytest.mark.pipeline


def test_up_serves_the_demo_model_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_REDIS_URL"}
    env.update(LLAVA_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--port", str(port), "--web-port", str(web_port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    launcher = psutil.Process(up.pid)
    try:

        def serving() -> bool:
            models = httpx.get(f"{url}/api/v1/models", timeout=2).json()["models"]
            return any(m["name"] == "llava-v1-shapes-demo" and m["workers"] >= 1 for m in models)

        def output() -> str:
            return (tmp_path / "up.log").read_text(errors="replace")

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and up.poll() is None and "llava-serve is up" not in output():
            time.sleep(0.2)
        assert "llava-serve is up" in output(), output()
        assert serving(), "up said it was up before a worker of the model registered"
        (demo,) = httpx.get(f"{url}/api/v1/models", timeout=2).json()["models"]
        assert demo["image_modes"] == ["resize", "default"]  # the page offers only what the model was trained with
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{web_port}/", timeout=2).status_code == 200, 60, "the UI")

        # the default model is the shipped demo, which sees: ask about the UI's first example image
        image = base64.b64encode((EXAMPLES_DIR / "demo_0_red_circle.png").read_bytes()).decode()
        request = GenerateRequest.model_validate({
            "model": "llava-v1-shapes-demo", "temperature": 0, "max_new_tokens": 16,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": "What colour is the shape?"}]}],
        })  # fmt: skip
        client = ControllerClient(url)
        events = list(client.generate(request))
        client.close()
        assert events[-1].type == "done" and any(e.type == "token" for e in events), events
        assert "red" in events[-1].text.lower()

        # the embedded Redis keeps its data in the cache dir, append-only
        assert list((tmp_path / "cache" / "data" / "redis").rglob("*.aof*")), "no append-only file"
        family = launcher.children(recursive=True)
        assert len(family) >= 4  # redis-server, controller, worker, web (and their helpers)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        finally:
            log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text(errors="replace")[-3000:]
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


def test_the_ui_gets_the_first_api_key_when_keys_are_required(tmp_path: Path) -> None:
    from cli.up import _web_env

    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfirst-key\nsecond-key\n")
    assert _web_env({}, keys)["LLAVA_WEB_API_KEY"] == "first-key"
    assert _web_env({"LLAVA_API_KEYS": "env-key"}, None)["LLAVA_WEB_API_KEY"] == "env-key"
    assert _web_env({"LLAVA_API_KEYS": "a", "LLAVA_WEB_API_KEY": "own"}, None)["LLAVA_WEB_API_KEY"] == "own"
    assert "LLAVA_WEB_API_KEY" not in _web_env({}, None)


def test_restart_back_off_grows_with_quick_exits_and_resets_after_a_healthy_run() -> None:
    from cli.up import HEALTHY_RUN_S, RESTART_BACKOFF_S, Child

    child = Child("worker-1", ["true"], {})
    child.started_at = 1000.0
    delays = []
    for _ in range(3):  # exits right after each start
        delays.append(child.restart_delay_s(exited_at=child.started_at + 1))
    assert delays == list(RESTART_BACKOFF_S[:3])
    # killed again minutes later, after running healthily: the back-off starts over
    assert child.restart_delay_s(exited_at=child.started_at + HEALTHY_RUN_S + 1) == RESTART_BACKOFF_S[0]
    assert child.restart_delay_s(exited_at=child.started_at + 1) == RESTART_BACKOFF_S[1]


def test_the_controller_trusts_the_ui_key_to_name_each_person(tmp_path: Path) -> None:
    from cli.up import _controller_env

    keys = tmp_path / "keys"
    keys.write_text("first-key\nsecond-key\n")
    assert _controller_env({}, keys)["LLAVA_CONTROLLER_TRUSTED_UI_KEYS"] == "first-key"
    own = {"LLAVA_API_KEYS": "a,b", "LLAVA_WEB_API_KEY": "b"}
    assert _controller_env(own, None)["LLAVA_CONTROLLER_TRUSTED_UI_KEYS"] == "b"
    assert "LLAVA_CONTROLLER_TRUSTED_UI_KEYS" not in _controller_env({"LLAVA_WEB_API_KEY": "not-a-key"}, keys)
    assert "LLAVA_CONTROLLER_TRUSTED_UI_KEYS" not in _controller_env({}, None)


def test_the_demo_worker_started_by_up_offers_only_the_modes_it_was_trained_with():
    from cli.up import _default_model
    from workers.demo.train import DEMO_IMAGE_MODES, DEMO_MODEL_NAME

    _, name, modes = _default_model(tiny=False)
    assert name == DEMO_MODEL_NAME and modes == DEMO_IMAGE_MODES and "pad" not in modes
