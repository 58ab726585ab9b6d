"""llava-serve processes started through the CLI and waited on until they serve: for `up`, benchmarks and
end-to-end tests. Each child runs in its own process group, never outlives this process, and is stopped and
reaped by `stop()`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from contract.client import ControllerClient
from contract.errors import LlavaError
from infra.embedded_redis import free_port
from infra.process import die_with_parent

# the directory holding the packages, so `python -m cli.main` resolves from a source checkout too
ROOT = Path(__file__).resolve().parent.parent


class WaitFailed(RuntimeError):
    """A child exited, or what was waited for did not happen in time; the message holds the children's logs."""


class Proc:
    """A llava-serve child process whose output goes to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def cli(*args: str) -> list[str]:
    """The argv that runs `llava-serve ARGS...` with this interpreter."""
    return [sys.executable, "-m", "cli.main", *args]


def env_for(redis_url: str) -> dict[str, str]:
    return {**os.environ, "LLAVA_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, procs: list[Proc] = ()) -> None:
    """Return once `predicate()` is true; WaitFailed, with the children's logs, if one of `procs` exits or
    `timeout_s` seconds pass first. HTTP and OS errors of the predicate count as false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise WaitFailed(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}:\n"
                                     f"{proc.log()}")  # fmt: skip
        try:
            if predicate():
                return
        except (httpx.HTTPError, OSError, LlavaError):  # not answering yet
            pass
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in procs)
    raise WaitFailed(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")


def start_controller(redis_url: str, log_dir: Path, *extra: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(f"controller-{port}", cli("controller", "--port", str(port), *extra), env_for(redis_url), log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, 60, "the controller", [proc])
    return proc, url


def start_worker(redis_url: str, log_dir: Path, name: str, *args: str) -> Proc:
    return Proc(name, cli("worker", *args), env_for(redis_url), log_dir)


def live_workers(controller_url: str, model: str, api_key: str | None = None) -> int:
    """How many live workers the controller lists for `model` (0 when it does not list the model)."""
    client = ControllerClient(controller_url, api_key=api_key)
    try:
        return next((info.workers for info in client.list_models() if info.name == model), 0)
    finally:
        client.close()


def wait_for_workers(controller_url: str, model: str, count: int, procs: list[Proc], timeout_s: float = 90) -> None:
    wait_until(lambda: live_workers(controller_url, model) >= count, timeout_s, f"{count} worker(s) of {model}", procs)
