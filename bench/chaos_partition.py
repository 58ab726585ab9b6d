"""A worker cut from Redis by a network partition under load, every process on a host of its own.

Redis, two controllers and three workers (w1, w2, w3) each run in a network namespace with its own address on a
private bridge (cli/netns.py); this process is the client and reaches the controllers (and, to observe, Redis)
through the bridge. The workers run the scripted engine (workers/scripted.py), a deterministic fake engine for fault
tests of the broker, not a model, so every reply is checked word for word. `in_flight` streams stay open at all
times (bench/chaos_requests.py). Once w3 streams a few jobs, its port on the bridge goes down for `partition_s`: w3
keeps running but nothing it sends reaches Redis. Measured: how every request ended; cut to `worker_lost` of the streams
w3 held (target within WORKER_LOST_TARGET_S); `worker_lost` of jobs w3 did not hold (false sweeps); messages on the
channels of w3's jobs after they were given away (its streams failed, its unstarted jobs requeued), as Redis itself
delivered them; when w3's key came back after the heal; what is left in Redis once everything has stopped.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis as redis_lib

from bench.channel_log import ChannelLog
from bench.chaos_requests import Clients, RequestRecord, count_outcomes, leftovers
from bench.common import percentile
from bench.load_checks import MODEL
from cli.netns import Network, unavailable_reason
from cli.processes import Proc, cli, env_for, wait_until
from contract import jobs, keys
from contract.messages import ClaimState, DoneEvent, ErrorEvent, StreamEvent, TokenEvent
from infra.embedded_redis import redis_server_binary
from infra.redis import connect

PARTITIONED = "w3"
WORKERS = ("w1", "w2", PARTITIONED)
WORKER_LOST_TARGET_S = 15.0
CONTROLLER_PORT = 10000
REDIS_PORT = 6379
UNSTARTED = {ClaimState.claimed.value, ClaimState.started.value}


class PartitionUnavailable(RuntimeError):
    """Network namespaces cannot be made here; the message says why."""


@dataclass
class PartitionConfig:
    in_flight: int = 12
    partition_s: float = 20.0
    warmup_s: float = 3.0  # streams run this long before w3 is cut
    after_heal_s: float = 5.0  # streams keep running this long once w3 is back
    reregister_timeout_s: float = 60.0
    step_delay_s: float = 0.05
    max_batch: int = 4  # 12 streams fill three workers: the cut worker holds a full batch, the others queue
    streaming_at_cut: int = 3  # w3 is cut once it streams at least this many jobs
    stream_timeout_s: float = 120.0


@dataclass
class PartitionReport:
    config: dict
    requests: int = 0
    done: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    hung: int = 0
    cut_streaming: int = 0  # jobs w3 was streaming when cut
    cut_unstarted: int = 0  # jobs w3 had claimed (or started) with nothing streamed yet
    cut_to_error_p50_s: float | None = None
    cut_to_error_max_s: float | None = None
    cut_streams_not_worker_lost: int = 0  # w3's streams that did not end with a worker_lost error
    unstarted_not_served: int = 0  # w3's unstarted jobs not done, word for word, by another worker
    false_sweeps: int = 0  # worker_lost errors of jobs w3 did not hold
    events_after_give_away: int = 0
    key_expired_after_cut_s: float | None = None
    reregistered_after_heal_s: float | None = None
    done_by_cut_worker_after_heal: int = 0
    leftover: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class Cut:
    at: float = 0.0
    healed_at: float = 0.0
    streaming: set[str] = field(default_factory=set)
    unstarted: set[str] = field(default_factory=set)
    key_expired_at: float | None = None
    reregistered_at: float | None = None


class PartitionSystem:
    """Redis, two controllers and the workers, each in a namespace of its own on `net`."""

    def __init__(self, net: Network, workdir: Path, config: PartitionConfig) -> None:
        self.net = net
        self.workdir = workdir
        self.config = config
        self.procs: dict[str, Proc] = {}
        self.redis_url = ""
        self.controller_urls: list[str] = []
        self.redis = None

    def start(self) -> None:
        self.net.create()
        host = self.net.add_host("redis")
        self.redis_url = f"redis://{host.address}:{REDIS_PORT}/0"
        argv = [redis_server_binary(), "--bind", host.address, "--port", str(REDIS_PORT), "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"]  # fmt: skip
        self.procs["redis"] = Proc("redis", host.argv(argv), dict(os.environ), self.workdir)
        self.redis = connect(self.redis_url)
        wait_until(self._answers, 30, "redis-server", list(self.procs.values()))
        for k in (1, 2):
            host = self.net.add_host(f"controller{k}")
            argv = cli("controller", "--host", host.address, "--port", str(CONTROLLER_PORT))
            self.procs[host.role] = Proc(host.role, host.argv(argv), env_for(self.redis_url), self.workdir)
            self.controller_urls.append(f"http://{host.address}:{CONTROLLER_PORT}")
        for url in self.controller_urls:
            ready = lambda url=url: httpx.get(f"{url}/readyz", timeout=2, trust_env=False).status_code == 200  # noqa: E731
            wait_until(ready, 60, f"the controller at {url}", list(self.procs.values()))
        for name in WORKERS:
            argv = cli("worker", "--engine", "scripted", "--model-path", MODEL, "--worker-id", name,
                       "--scripted-step-delay", str(self.config.step_delay_s), "--max-batch",
                       str(self.config.max_batch))  # fmt: skip
            host = self.net.add_host(name)
            self.procs[name] = Proc(name, host.argv(argv), env_for(self.redis_url), self.workdir)
        registered = lambda: all(self.redis.exists(keys.worker(n)) for n in WORKERS)  # noqa: E731
        wait_until(registered, 60, "the workers to register", list(self.procs.values()))

    def _answers(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis_lib.RedisError:  # not listening yet
            return False

    def stop_serving(self) -> None:
        """Workers, then controllers (each one's shutdown may still want Redis); Redis stays up to be read."""
        self.net.heal_all()  # a run that failed mid-partition leaves no worker draining into a cut link
        for name in [*WORKERS, "controller1", "controller2"]:
            if name in self.procs:
                self.procs[name].stop(timeout_s=20)

    def stop(self) -> list[str]:
        """Everything stopped and the network removed; returns what of the network could not be removed."""
        self.stop_serving()
        if self.redis is not None:
            self.redis.close()
        if "redis" in self.procs:
            self.procs["redis"].stop(timeout_s=20)
        return self.net.destroy()


def held(redis, worker_id: str) -> dict[str, str]:
    """What a worker holds in Redis: its job table, plus inbox ids (claimed) not yet moved into the table."""
    table = {k.decode(): v.decode() for k, v in redis.hgetall(keys.worker_jobs(worker_id)).items()}
    for raw in redis.lrange(keys.worker_inbox(worker_id), 0, -1):
        table.setdefault(raw.decode(), ClaimState.claimed.value)
    return table


def settled(redis, worker_id: str, reads: int = 12, apart_s: float = 0.25) -> dict[str, str]:
    """`held()` once two reads `apart_s` apart agree: Redis has run whatever reached it before a cut."""
    previous = held(redis, worker_id)
    for _ in range(reads):
        time.sleep(apart_s)
        current = held(redis, worker_id)
        if current == previous:
            return current
        previous = current
    return previous


def partition_schedule(system: PartitionSystem, clients: Clients, config: PartitionConfig) -> Cut:
    """Warm up, cut w3 once it streams enough jobs, hold the cut, heal, wait for w3's key, keep the load a while."""
    redis, cut, procs = system.redis, Cut(), list(system.procs.values())
    time.sleep(config.warmup_s)
    streaming = lambda: list(held(redis, PARTITIONED).values()).count(ClaimState.streaming.value)  # noqa: E731
    wait_until(lambda: streaming() >= config.streaming_at_cut, 60,
               f"{PARTITIONED} to stream {config.streaming_at_cut} job(s)", procs)  # fmt: skip
    clients.phase = "partition"
    cut.at = time.perf_counter()
    system.net.cut(system.net.hosts[PARTITIONED])
    table = settled(redis, PARTITIONED)
    cut.streaming = {j for j, state in table.items() if state == ClaimState.streaming.value}
    cut.unstarted = {j for j, state in table.items() if state in UNSTARTED}
    while time.perf_counter() < cut.at + config.partition_s:
        if cut.key_expired_at is None and not redis.exists(keys.worker(PARTITIONED)):
            cut.key_expired_at = time.perf_counter()
        time.sleep(0.05)
    system.net.heal(system.net.hosts[PARTITIONED])
    cut.healed_at = time.perf_counter()
    clients.phase = "healed"
    deadline = time.monotonic() + config.reregister_timeout_s
    while cut.reregistered_at is None and time.monotonic() < deadline:
        if redis.exists(keys.worker(PARTITIONED)):
            cut.reregistered_at = time.perf_counter()
        time.sleep(0.05)
    time.sleep(config.after_heal_s)
    return cut


def after_give_away(messages: list[tuple[float, StreamEvent]], streaming: bool) -> int:
    """Messages on a job's channel that only the cut worker can have published once its job was given away: for a
    job it was streaming, anything after the `worker_lost` error; for one it had not started, token seqs seen twice
    and anything after the first final event (another worker serves it whole, seq 1 to `done`)."""
    events = [event for _, event in messages]
    if streaming:
        lost = [k for k, e in enumerate(events) if isinstance(e, ErrorEvent) and e.code == "worker_lost"]
        return len(events) - lost[0] - 1 if lost else 0
    finals = [k for k, e in enumerate(events) if isinstance(e, DoneEvent | ErrorEvent)]
    until = finals[0] + 1 if finals else len(events)
    seqs = [e.seq for e in events[:until] if isinstance(e, TokenEvent)]
    return len(seqs) - len(set(seqs)) + len(events) - until


def measure(system: PartitionSystem, records: list[RequestRecord], cut: Cut, observer: ChannelLog,
            config: PartitionConfig) -> PartitionReport:  # fmt: skip
    report = PartitionReport(config=asdict(config))
    outcomes = count_outcomes(records)
    report.requests, report.done, report.errors = outcomes.requests, outcomes.done, outcomes.errors
    report.lost, report.hung, report.problems = outcomes.lost, outcomes.hung, list(outcomes.problems)
    if outcomes.cut:
        report.problems.append(f"{outcomes.cut} request(s) counted as cut though no controller was killed")
    report.cut_streaming, report.cut_unstarted = len(cut.streaming), len(cut.unstarted)
    by_job = {r.job_id: r for r in records if r.job_id}
    latencies = []
    for job_id in sorted(cut.streaming):
        r = by_job.get(job_id)
        if r is not None and r.outcome == "error:worker_lost" and r.ended_at is not None:
            latencies.append(r.ended_at - cut.at)
        else:
            report.cut_streams_not_worker_lost += 1
            outcome = r.outcome if r else "not a request of this run"
            report.problems.append(f"{PARTITIONED}'s stream {job_id}: {outcome}, not worker_lost")
    if latencies:
        report.cut_to_error_p50_s = round(percentile(latencies, 50), 2)
        report.cut_to_error_max_s = round(max(latencies), 2)
    for job_id in sorted(cut.unstarted):
        r = by_job.get(job_id)
        view = jobs.view(system.redis, job_id)
        served_by = view.outcome.worker_id if view and view.outcome else None
        if r is None or r.outcome != "done" or served_by == PARTITIONED:
            report.unstarted_not_served += 1
            report.problems.append(f"{PARTITIONED}'s unstarted job {job_id}: {r.outcome if r else 'no request'}, "
                                   f"written by {served_by}")  # fmt: skip
    held_jobs = cut.streaming | cut.unstarted
    report.false_sweeps = sum(r.outcome == "error:worker_lost" and r.job_id not in held_jobs for r in records)
    for job_id in sorted(held_jobs):
        if n := after_give_away(observer.of(job_id), job_id in cut.streaming):
            report.events_after_give_away += n
            report.problems.append(f"{n} message(s) on the channel of {job_id} after it was given away")
    if cut.key_expired_at is not None:
        report.key_expired_after_cut_s = round(cut.key_expired_at - cut.at, 2)
    else:
        report.problems.append(f"{PARTITIONED}'s key never expired during the {config.partition_s:g} s partition")
    if cut.reregistered_at is not None:
        report.reregistered_after_heal_s = round(cut.reregistered_at - cut.healed_at, 2)
    for r in records:
        if r.phase == "healed" and r.outcome == "done" and r.job_id:
            view = jobs.view(system.redis, r.job_id)
            by_cut_worker = view is not None and view.outcome is not None and view.outcome.worker_id == PARTITIONED
            report.done_by_cut_worker_after_heal += by_cut_worker
    return report


def run_partition(config: PartitionConfig) -> PartitionReport:
    """Start the system on its namespaces, run the partition under load, stop everything and report."""
    reason = unavailable_reason()
    if reason is not None:
        raise PartitionUnavailable(reason)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llava-partition-") as tmp:
        system = PartitionSystem(Network(), Path(tmp), config)
        network_left = ["not removed: the run failed first"]
        try:
            system.start()
            observer = ChannelLog(system.redis_url)
            observer.start()
            try:
                clients = Clients(system.controller_urls, MODEL, "scripted", config.in_flight, config.stream_timeout_s)
                # Faults run on this thread: children die with the thread that started them (PR_SET_PDEATHSIG).
                streams = threading.Thread(target=asyncio.run, args=(clients.run(),))
                streams.start()
                try:
                    cut = partition_schedule(system, clients, config)
                finally:
                    clients.stopping = True
                    streams.join()
                observer.publish_marker()
                wait_until(observer.caught_up, 30, "the channel log to catch up")
            finally:
                observer.stop()
            report = measure(system, clients.records, cut, observer, config)
            system.stop_serving()
            report.leftover = leftovers(system.redis, MODEL)
        finally:
            network_left = system.stop()
    report.problems += [f"namespace network: {line}" for line in network_left]
    report.wall_s = round(time.perf_counter() - started, 1)
    return report


def print_table(report: PartitionReport) -> None:
    errors = ", ".join(f"{code} {n}" for code, n in report.errors.items()) or "none"
    rows = [
        ("requests", report.requests), ("done", report.done), ("error by code", errors),
        ("lost / hung", f"{report.lost} / {report.hung}"),
        (f"{PARTITIONED}'s jobs at the cut: streaming / unstarted", f"{report.cut_streaming} / {report.cut_unstarted}"),
        ("cut→worker_lost p50 / max (s)", f"{report.cut_to_error_p50_s} / {report.cut_to_error_max_s}"),
        (f"{PARTITIONED}'s streams not ended worker_lost", report.cut_streams_not_worker_lost),
        (f"{PARTITIONED}'s unstarted jobs not served by another", report.unstarted_not_served),
        ("false sweeps (worker_lost of other workers' jobs)", report.false_sweeps),
        (f"messages from {PARTITIONED} after its jobs were given away", report.events_after_give_away),
        (f"{PARTITIONED}'s key expired after the cut (s)", report.key_expired_after_cut_s),
        (f"{PARTITIONED} registered again after the heal (s)", report.reregistered_after_heal_s),
        (f"done by {PARTITIONED} after the heal", report.done_by_cut_worker_after_heal),
        ("left in Redis", len(report.leftover)), ("wall (s)", report.wall_s),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print(f"partition run, scripted engine, {PARTITIONED} cut from Redis for {report.config['partition_s']:g} s, "
          f"{report.config['in_flight']} streams in flight")  # fmt: skip
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for line in [*report.problems[:10], *report.leftover[:10]]:
        print(f"  ! {line}")


def failed(report: PartitionReport) -> bool:
    late = report.cut_to_error_max_s is not None and report.cut_to_error_max_s > WORKER_LOST_TARGET_S
    return bool(report.lost or report.hung or report.false_sweeps or report.events_after_give_away or late
                or report.cut_streams_not_worker_lost or report.unstarted_not_served or report.leftover
                or report.reregistered_after_heal_s is None or report.problems)  # fmt: skip
