"""The whole system under faults, and what happened to every request.

    python -m bench.chaos [--engine scripted|tiny] [--workers 3] [--in-flight 12] [--kills 100]
                          [--outages 2,8,20] [--restarts 1] [--cpu-hogs 2] [--no-controller-kill]
                          [--partition auto|only|off] [--partition-s 20] [--out bench/results/chaos.json]
                          [--partition-out bench/results/chaos_partition.json] [--workdir DIR]

Real processes: an embedded append-only redis-server, two `llava-serve controller` replicas and `--workers`
`llava-serve worker` processes, with either the scripted engine (workers/scripted.py: a deterministic fake engine
for fault tests of the broker, not a model, so every reply can be checked word for word) or the real tiny
random-weight LLaVA (`--engine tiny`: the reply cannot be predicted, so only its consistency is checked).
Clients keep `--in-flight` SSE streams open at all times, spread over the controllers, while three phases run:

1. worker deaths: `--kills` times, a random worker gets SIGKILL or SIGSTOP (mixed) and a replacement starts; a
   stopped worker is woken (SIGCONT) after the death-detection bound and then stopped, to check that it does not
   publish into streams another worker now owns; `--cpu-hogs` busy processes load every core meanwhile, so a live
   worker whose heartbeat competes for the CPU must still never be swept;
2. Redis: `--restarts` restarts, then outages of `--outages` seconds each (the server stopped and started again on
   the same port with its append-only file);
3. one controller of the two killed (SIGKILL) while its streams run.

Every request ends as one of: done (and right), error by code, cut (its controller was killed: the client sees the
connection close, which is all a dead process can give), lost (neither done nor error, or a `done` whose text or
seq is wrong) or hung (nothing final within the stream timeout, 120 s). Also measured: kill-to-error latency of the
streams a dead worker held (p50 / max), `worker_lost` errors of jobs no killed worker held (false sweeps), errors
during outages shorter than the controller's outage allowance (false errors), tokens generated after their
controller died (for no client), and what is left in Redis once everything has stopped. Prints a table, writes
JSON (default bench/results/chaos.json).

Then, with `--partition auto` (the default) where network namespaces can be made, or alone with `--partition only`,
the partition run (bench/chaos_partition.py, scripted engine): every process on a host of its own, one worker cut
from Redis for `--partition-s` seconds under the same load. Its own table and JSON (`--partition-out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis as redis_lib

from bench.chaos_partition import PartitionConfig, run_partition
from bench.chaos_partition import failed as partition_failed
from bench.chaos_partition import print_table as print_partition_table
from bench.chaos_requests import Clients, count_outcomes, leftovers
from bench.common import percentile
from cli.netns import unavailable_reason
from cli.processes import Proc, cli, env_for, start_controller, wait_for_workers
from contract import keys
from contract.client import ControllerClient
from infra.embedded_redis import EmbeddedRedis
from infra.process import die_with_parent

SCRIPTED_MODEL = "scripted-load"
OUTAGE_ALLOWANCE_S = 30.0  # the controller's default Redis outage allowance
LEASE_CHECK_MARGIN_S = 1.0  # a worker sees a lease gone at its next step or claim after the TTL


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


@dataclass
class ChaosReport:
    config: dict
    requests: int = 0
    worker_kills: int = 0
    jobs_held_by_killed: int = 0  # jobs in the job tables of killed workers at the moment of the kill
    done: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cut: int = 0
    lost: int = 0
    hung: int = 0
    kill_to_error_p50_s: float | None = None
    kill_to_error_max_s: float | None = None
    false_worker_lost: int = 0
    false_outage_errors: int = 0  # accepted streams that ended in an error during an outage within the allowance
    refused_in_outages: int = 0  # requests refused on arrival (503) while Redis was down
    orphan_tokens: int = 0
    orphan_jobs: int = 0  # jobs of the killed controller still running once its lease ran out
    leftover: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per lost or hung request
    wall_s: float = 0.0


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


def measure(system: System, clients: Clients, kills: list[Kill], outages: list[tuple[float, float, float]],
            config: ChaosConfig) -> ChaosReport:  # fmt: skip
    report = ChaosReport(config={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()})
    records = clients.records
    outcomes = count_outcomes(records)
    report.requests, report.done, report.errors = outcomes.requests, outcomes.done, outcomes.errors
    report.cut, report.lost, report.hung = outcomes.cut, outcomes.lost, outcomes.hung
    report.problems = outcomes.problems

    held_by = {job_id: kill for kill in kills for job_id in kill.held}
    report.worker_kills, report.jobs_held_by_killed = len(kills), len(held_by)
    latencies = []
    for r in records:
        if r.outcome != "error:worker_lost":
            continue
        kill = held_by.get(r.job_id or "")
        if kill is None:
            report.false_worker_lost += 1
        elif r.ended_at is not None:
            latencies.append(r.ended_at - kill.at)
    if latencies:
        report.kill_to_error_p50_s = round(percentile(latencies, 50), 2)
        report.kill_to_error_max_s = round(max(latencies), 2)

    short = [(start, end) for start, end, duration in outages if duration < OUTAGE_ALLOWANCE_S]
    for r in records:
        if r.phase == "redis" and r.outcome.startswith("error:") and r.outcome != "error:worker_lost":
            if any(r.sent_at <= end and (r.ended_at or end) >= start for start, end in short):
                if r.accepted:
                    report.false_outage_errors += 1
                else:
                    report.refused_in_outages += 1

    if config.controller_kill:
        report.orphan_jobs, report.orphan_tokens = _orphans(system, clients)
    return report


def _orphans(system: System, clients: Clients) -> tuple[int, int]:
    """Jobs of the killed controller still generating once its lease had run out (neither done nor cancelled by
    then), and the tokens made after their client was cut."""
    cut = [r for r in clients.records if r.outcome == "cut" and r.job_id]
    bound = clients.controller_killed_at + keys.CONTROLLER_LEASE_TTL_S + LEASE_CHECK_MARGIN_S
    client = ControllerClient(system.urls[0])
    jobs, tokens = 0, 0
    deadline = time.monotonic() + 60
    try:
        for r in cut:
            outcome = client.job(r.job_id).outcome
            while outcome is None and time.monotonic() < deadline:
                time.sleep(0.2)  # polling a record that a worker will write; the deadline bounds it
                outcome = client.job(r.job_id).outcome
            if outcome is None or (outcome.timings.finished_at or bound + 1) > bound:
                jobs += 1  # still running, or ended only after its controller's lease had run out
            if outcome is not None:
                tokens += max(0, outcome.usage.completion_tokens - r.tokens_received)
    finally:
        client.close()
    return jobs, tokens


def run_chaos(config: ChaosConfig, workdir: Path | None = None) -> ChaosReport:
    """Start the system, run the phases with clients in flight, stop everything and report."""
    with tempfile.TemporaryDirectory(prefix="llava-chaos-") as tmp:
        workdir = workdir or Path(tmp)
        system = System(config, workdir)
        kills: list[Kill] = []
        outages: list[tuple[float, float, float]] = []
        started = time.perf_counter()
        try:
            system.start()
            clients = Clients(system.urls, system.model, config.engine, config.in_flight, config.stream_timeout_s)
            # Faults run on this thread: children die with the thread that started them (PR_SET_PDEATHSIG).
            streams = threading.Thread(target=asyncio.run, args=(clients.run(),))
            streams.start()
            try:
                fault_schedule(system, clients, config, kills, outages)
            finally:
                clients.stopping = True
                streams.join()
            report = measure(system, clients, kills, outages, config)
            for proc in [*system.workers.values(), *system.retired, *system.controllers]:
                proc.signal(signal.SIGCONT)
                proc.stop()
            report.leftover = leftovers(system.redis, system.model)
        finally:
            system.stop()
        report.wall_s = round(time.perf_counter() - started, 1)
        return report


def print_table(report: ChaosReport) -> None:
    errors = ", ".join(f"{code} {n}" for code, n in report.errors.items()) or "none"
    rows = [
        ("worker kills / jobs they held", f"{report.worker_kills} / {report.jobs_held_by_killed}"),
        ("requests", report.requests), ("done", report.done), ("error by code", errors),
        ("cut (controller killed)", report.cut),
        ("lost", report.lost), ("hung", report.hung),
        ("kill→error p50 / max (s)", f"{report.kill_to_error_p50_s} / {report.kill_to_error_max_s}"),
        ("false worker_lost (live worker swept)", report.false_worker_lost),
        ("accepted streams failed in outages within the allowance", report.false_outage_errors),
        ("requests refused on arrival (503) while Redis was down", report.refused_in_outages),
        ("jobs past the lease / tokens for no client", f"{report.orphan_jobs} / {report.orphan_tokens}"),
        ("left in Redis", len(report.leftover)), ("wall (s)", report.wall_s),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print(f"chaos run, engine {report.config['engine']}, {report.config['kills']} worker kills")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for line in [*report.problems[:10], *report.leftover[:10]]:
        print(f"  ! {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["scripted", "tiny"], default="scripted")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=12, help="streams kept open at all times")
    parser.add_argument("--kills", type=int, default=100, help="worker kills (SIGKILL and SIGSTOP mixed)")
    parser.add_argument("--kill-interval-s", type=float, default=1.5)
    parser.add_argument("--restarts", type=int, default=1, help="Redis restarts (down and straight back up)")
    parser.add_argument("--outages", default="2,8,20", help="Redis outages, seconds each, comma separated")
    parser.add_argument("--no-controller-kill", action="store_true")
    parser.add_argument("--cpu-hogs", type=int, default=2, help="busy processes beside the workers during the kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition", choices=["auto", "only", "off"], default="auto",
                        help="the partition run (scripted engine, network namespaces): auto runs it after the "
                             "faults above where namespaces can be made, only runs it alone")  # fmt: skip
    parser.add_argument("--partition-s", type=float, default=20.0, help="how long the worker is cut from Redis")
    parser.add_argument("--out", type=Path, default=Path("bench/results/chaos.json"))
    parser.add_argument("--partition-out", type=Path, default=Path("bench/results/chaos_partition.json"))
    parser.add_argument("--workdir", type=Path, help="keep Redis's files and every process's log of the fault run "
                        "here (default: a temporary directory, removed at the end)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.partition_s <= 0:
        parser.error(f"--partition-s must be above 0 s, not {args.partition_s:g}")
    unavailable = unavailable_reason() if args.partition != "off" else None
    if args.partition == "only" and unavailable is not None:
        print(f"the partition run needs network namespaces, which cannot be made here: {unavailable}")
        return 2
    bad = False
    if args.partition != "only":
        config = ChaosConfig(
            engine=args.engine, workers=args.workers, in_flight=args.in_flight, kills=args.kills,
            kill_interval_s=args.kill_interval_s, restarts=args.restarts, controller_kill=not args.no_controller_kill,
            cpu_hogs=args.cpu_hogs,
            outages_s=tuple(float(s) for s in args.outages.split(",") if s.strip()), seed=args.seed,
        )  # fmt: skip
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
        report = run_chaos(config, args.workdir)
        print_table(report)
        _write(args.out, asdict(report))
        bad = bool(report.lost or report.hung or report.false_worker_lost or report.false_outage_errors
                   or report.leftover)  # fmt: skip
    if args.partition != "off":
        if unavailable is not None:
            print(f"partition run skipped: network namespaces cannot be made here: {unavailable}")
        else:
            partition = run_partition(PartitionConfig(in_flight=args.in_flight, partition_s=args.partition_s))
            print_partition_table(partition)
            _write(args.partition_out, asdict(partition))
            bad = bad or partition_failed(partition)
    return 1 if bad else 0


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    raise SystemExit(main())
