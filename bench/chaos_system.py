"""The system of a chaos run (`bench.chaos`) and the faults done to it: its real processes (an append-only
embedded redis-server, two controllers, the workers and the CPU hogs) with the means to kill, freeze, stop and restart
them, and the schedule of the three fault phases (worker deaths, Redis restarts and outages, a controller killed).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis as redis_lib

from bench.chaos_requests import Clients
from cli.processes import Proc, cli, env_for, start_controller, wait_for_workers
from contract import keys
from infra.embedded_redis import EmbeddedRedis
from infra.process import die_with_parent

SCRIPTED_MODEL = "scripted-load"


@dataclass
class ChaosConfig:
    engine: str = "scripted"
    workers: int = 3
    in_flight: int = 12
    kills: int = 100
    kill_interval_s: float = 1.5
    stop_hold_s: float = 8.0  # how long a SIGSTOPped worker stays frozen before it is woken
    restarts: int = 1
    outages_s: tuple[float, ...] = (2.0, 8.0, 20.0)
    controller_kill: bool = True
    cpu_hogs: int = 2  # busy-looping processes beside the workers while they are killed: no live worker may be swept
    step_delay_s: float = 0.05
    stream_timeout_s: float = 120.0
    seed: int = 0


@dataclass
class Kill:
    worker_id: str
    how: str  # SIGKILL or SIGSTOP
    at: float
    held: list[str]


class System:
    """The processes under test, with the means to kill them."""

    def __init__(self, config: ChaosConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.redis_server = EmbeddedRedis(workdir / "redis", persist=True).start()
        self.redis = redis_lib.Redis.from_url(self.redis_server.url, socket_timeout=5)
        self.controllers: list[Proc] = []
        self.urls: list[str] = []
        self.workers: dict[str, Proc] = {}
        self.retired: list[Proc] = []
        self.lock = threading.Lock()
        self.next_worker = 0
        self.hogs: list[subprocess.Popen] = []
        self.model, self.worker_args = self._engine_args()

    def _engine_args(self) -> tuple[str, list[str]]:
        if self.config.engine == "scripted":
            delay = str(self.config.step_delay_s)
            args = ["--engine", "scripted", "--model-path", SCRIPTED_MODEL, "--scripted-step-delay", delay]
            return SCRIPTED_MODEL, [*args, "--max-batch", "16"]
        from workers.tiny_model import build_tiny_model

        path = build_tiny_model(self.workdir / "tiny-chaos")
        return path.name, ["--model-path", str(path), "--max-batch", "8", "--device", "cpu", "--threads", "1"]

    def start(self) -> None:
        for _ in range(2):
            proc, url = start_controller(self.redis_server.url, self.workdir)
            self.controllers.append(proc)
            self.urls.append(url)
        for _ in range(self.config.workers):
            self.start_worker()
        wait_for_workers(self.urls[0], self.model, self.config.workers, list(self.workers.values()))

    def start_worker(self) -> str:
        with self.lock:
            worker_id = f"chaos-w{self.next_worker}"
            self.next_worker += 1
        proc = Proc(worker_id, cli("worker", "--worker-id", worker_id, *self.worker_args),
                    env_for(self.redis_server.url), self.workdir)  # fmt: skip
        with self.lock:
            self.workers[worker_id] = proc
        return worker_id

    def start_hogs(self, count: int) -> None:
        """Processes that keep every core busy, so that heartbeats compete for the CPU as under a long prefill."""
        spin = [sys.executable, "-c", "while True: pass"]
        self.hogs += [subprocess.Popen(spin, preexec_fn=die_with_parent) for _ in range(count)]

    def stop_hogs(self) -> None:
        for hog in self.hogs:
            hog.kill()
            hog.wait()
        self.hogs = []

    def kill_worker(self, rng: random.Random) -> Kill:
        with self.lock:
            worker_id = rng.choice(sorted(self.workers))
            proc = self.workers.pop(worker_id)
        how = rng.choice(["SIGKILL", "SIGSTOP"])
        proc.signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGSTOP)
        at = time.perf_counter()
        # The job table of a dead or frozen worker stays as it was until a sweeper takes it: what it held.
        held = [raw.decode() for raw in self._retry(lambda: self.redis.hkeys(keys.worker_jobs(worker_id)))]
        self.start_worker()
        if how == "SIGSTOP":
            threading.Timer(self.config.stop_hold_s, self._wake_and_stop, [proc]).start()
        else:
            self.retired.append(proc)
        return Kill(worker_id, how, at, held)

    def _wake_and_stop(self, proc: Proc) -> None:
        """A frozen worker wakes up after its jobs went elsewhere; then it is stopped for good."""
        proc.signal(signal.SIGCONT)
        threading.Timer(2.0, proc.signal, [signal.SIGTERM]).start()
        self.retired.append(proc)

    def _retry(self, call, attempts: int = 50):
        for _ in range(attempts - 1):
            try:
                return call()
            except redis_lib.RedisError:
                time.sleep(0.2)
        return call()

    def redis_down(self) -> None:
        self.redis_server.stop()

    def redis_up(self) -> None:
        self.redis_server.start()

    def stop(self) -> None:
        self.stop_hogs()
        for proc in [*self.workers.values(), *self.retired, *self.controllers]:
            proc.signal(signal.SIGCONT)
            proc.stop()
        self.redis.close()
        self.redis_server.stop()


def fault_schedule(system: System, clients: Clients, config: ChaosConfig, kills: list[Kill],
                   outages: list[tuple[float, float, float]]) -> None:  # fmt: skip
    """The three phases, one after the other, while the clients keep streams in flight."""
    rng = random.Random(config.seed)
    time.sleep(2.0)
    clients.phase = "kills"
    system.start_hogs(config.cpu_hogs)
    for _ in range(config.kills):
        time.sleep(config.kill_interval_s)
        kills.append(system.kill_worker(rng))
    time.sleep(config.stop_hold_s + 4.0)
    system.stop_hogs()
    clients.phase = "redis"
    for duration in [0.0] * config.restarts + list(config.outages_s):
        time.sleep(3.0)
        start = time.perf_counter()
        system.redis_down()
        time.sleep(duration)
        system.redis_up()
        outages.append((start, time.perf_counter(), duration))
    time.sleep(5.0)
    if config.controller_kill:
        clients.phase = "controller"
        time.sleep(3.0)
        clients.killed_controller = 1
        clients.live_controllers = [0]
        system.controllers[1].signal(signal.SIGKILL)
        clients.controller_killed_at = time.time()
        time.sleep(3.0)
    clients.stopping = True
