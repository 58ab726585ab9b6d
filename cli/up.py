"""`llava-serve up`: the whole system in one command, stopped with Ctrl-C leaving no process behind."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from cli.processes import cli, live_workers
from contract.errors import LlavaError
from infra.embedded_redis import EmbeddedRedis
from infra.process import die_with_parent
from infra.settings import CONTROLLER_PORT, WEB_PORT, default_cache_dir

log = logging.getLogger("llava.up")

RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
HEALTHY_RUN_S = 60.0


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("LLAVA_REDIS_URL"),
        help="use this Redis (default: LLAVA_REDIS_URL, else start an embedded redis-server)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="embedded Redis data (append-only file); default: <cache dir>/data"
    )
    parser.add_argument(
        "--model-path",
        default=None,
        help="model dir or HF id for the workers (default: the shipped shapes demo model)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="serve the tiny random-weight model instead (its answers are noise)"
    )
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--workers", type=int, default=1, help="number of model workers (default 1)")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N (workers start on cuda:0..N-1 "
        "in turn when 'cuda' is given and several GPUs are visible)",
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--host", default="127.0.0.1", help="address the controller and UI listen on")
    parser.add_argument("--port", type=int, default=CONTROLLER_PORT, help="controller port (default 10000)")
    parser.add_argument("--web-port", type=int, default=WEB_PORT, help="web UI port (default 7860)")
    parser.add_argument("--no-web", action="store_true", help="do not start the web UI")
    parser.add_argument(
        "--api-keys",
        type=Path,
        default=None,
        help="require bearer keys (file, one per line; or LLAVA_API_KEYS); the UI uses the first, and the controller "
        "trusts it to name each person on the page, so that per-client limits count per person",
    )


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=die_with_parent)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def restart_delay_s(self, exited_at: float) -> int:
        """Seconds to wait before restarting the child that exited at `exited_at` (monotonic); counts the restart.
        The back-off grows while the child keeps exiting soon after its start, and starts over after a healthy run."""
        if exited_at - self.started_at >= HEALTHY_RUN_S:
            self.restarts = 0
        delay_s = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        self.restarts += 1
        return delay_s

    def stop(self, timeout_s: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _wait_ready(url: str, children: list[Child], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(c.process is not None and c.process.poll() is not None for c in children):
            return False
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _default_model(tiny: bool) -> tuple[str, str, tuple[str, ...] | None]:
    """(path, name, image modes or None for all) of the model served when none is given: the trained shapes demo,
    or the tiny random one."""
    if tiny:
        from workers.tiny_model import TINY_MODEL_NAME, ensure_tiny_model

        return str(ensure_tiny_model(default_cache_dir() / "models")), TINY_MODEL_NAME, None
    from workers.demo.train import DEMO_IMAGE_MODES, DEMO_MODEL_NAME, demo_model_path

    return str(demo_model_path()), DEMO_MODEL_NAME, DEMO_IMAGE_MODES


def _cpu_threads_per_worker(device: str, workers: int) -> int | None:
    """Several workers on the CPU share its cores instead of each taking all of them (oversubscribed torch
    threads wait on each other); None leaves torch's default."""
    if workers < 2 or device.startswith("cuda"):
        return None
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return None
    return max(1, (os.cpu_count() or 1) // workers)


def _model_served(controller_url: str, model: str, api_keys_file: Path | None, env: dict[str, str]) -> bool:
    """True once a worker of `model` has registered (the controller lists it with a live worker)."""
    api_key = _web_env(env, api_keys_file).get("LLAVA_WEB_API_KEY")
    try:
        return live_workers(controller_url, model, api_key) >= 1
    except LlavaError:  # not up yet, or refusing: not served yet
        return False


def _web_env(env: dict[str, str], api_keys_file: Path | None) -> dict[str, str]:
    """The UI's environment: with API keys required and no key of its own, it uses the first one."""
    from broker.auth import load_api_keys

    keys = load_api_keys(env.get("LLAVA_API_KEYS"), api_keys_file)
    if keys and not env.get("LLAVA_WEB_API_KEY"):
        return {**env, "LLAVA_WEB_API_KEY": keys[0]}
    return env


def _controller_env(env: dict[str, str], api_keys_file: Path | None) -> dict[str, str]:
    """The controller's environment: it trusts the UI's key to name each person using the page (so limits count
    per person, not for the page as a whole), unless trusted UI keys are set already."""
    from broker.auth import load_api_keys

    web_key = _web_env(env, api_keys_file).get("LLAVA_WEB_API_KEY")
    keys = load_api_keys(env.get("LLAVA_API_KEYS"), api_keys_file)
    if web_key and web_key in keys and not env.get("LLAVA_CONTROLLER_TRUSTED_UI_KEYS"):
        return {**env, "LLAVA_CONTROLLER_TRUSTED_UI_KEYS": web_key}
    return env


def _print_banner(args: argparse.Namespace, controller_url: str, redis_url: str, model: str) -> None:
    print(f"\nllava-serve is up\n  controller  {controller_url}  (API: {controller_url}/docs)", flush=True)
    if not args.no_web:
        print(f"  web UI      http://{args.host}:{args.web_port}", flush=True)
    print(f"  redis       {redis_url}", flush=True)
    print(f"  model       {model} ({args.workers} worker(s))", flush=True)
    print("Press Ctrl-C to stop.\n", flush=True)


def run_up(args: argparse.Namespace) -> int:
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)

    redis_server = None
    redis_url = args.redis_url
    if not redis_url:
        data_dir = args.data_dir or default_cache_dir() / "data"
        redis_server = EmbeddedRedis(data_dir / "redis").start()
        redis_url = redis_server.url
        log.info("embedded redis-server on %s (data in %s)", redis_url, data_dir / "redis")

    if args.model_path:
        model_path, model_name, image_modes = args.model_path, args.model_name, None
    else:
        model_path, model_name, image_modes = _default_model(args.tiny)
    model_name = args.model_name or model_name
    env = {**os.environ, "LLAVA_REDIS_URL": redis_url}
    controller_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    controller_argv = cli("controller", "--host", args.host, "--port", str(args.port))
    if args.api_keys:
        controller_argv += ["--api-keys", str(args.api_keys)]
    children = [Child("controller", controller_argv, _controller_env(env, args.api_keys) if not args.no_web else env)]
    cpu_threads = _cpu_threads_per_worker(args.device, args.workers)
    for i in range(args.workers):
        device = args.device
        if device == "cuda" and args.workers > 1:
            device = f"cuda:{i}"
        argv = cli("worker", "--model-path", model_path, "--device", device, "--dtype", args.dtype,
                    "--max-batch", str(args.max_batch))  # fmt: skip
        if cpu_threads:
            argv += ["--threads", str(cpu_threads)]
        if model_name:
            argv += ["--model-name", model_name]
        if image_modes:
            argv += ["--image-modes", ",".join(image_modes)]
        children.append(Child(f"worker-{i + 1}", argv, env))
    if not args.no_web:
        web_argv = cli("web", "--controller-url", controller_url, "--host", args.host, "--port", str(args.web_port))
        children.append(Child("web", web_argv, _web_env(env, args.api_keys)))

    try:
        for child in children:
            child.start()
        if not _wait_ready(f"{controller_url}/readyz", children[:1], timeout_s=60):
            log.error("the controller did not become ready; see its log above")
            return 1
        served_name = model_name or model_path.rstrip("/").split("/")[-1]
        log.info("the controller is ready; waiting for a worker of %s to load it", served_name)
        announced = False
        while not stopping:
            if not announced and _model_served(controller_url, served_name, args.api_keys, env):
                announced = True
                _print_banner(args, controller_url, redis_url, served_name)
            time.sleep(0.5)
            for child in children:
                if child.process is None or child.process.poll() is None or stopping:
                    continue
                rc = child.process.returncode
                backoff_s = child.restart_delay_s(exited_at=time.monotonic())
                log.warning("%s exited with code %s; restarting in %d s", child.name, rc, backoff_s)
                time.sleep(backoff_s)
                if not stopping:
                    child.start()
    finally:
        log.info("stopping")
        for child in reversed(children):
            child.stop(timeout_s=45 if child.name.startswith("worker") else 10)
        if redis_server is not None:
            redis_server.stop()
    return 0
