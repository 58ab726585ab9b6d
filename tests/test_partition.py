"""A worker cut off from Redis by a network partition, with every process on a host of its own.

Redis, two controllers and three workers each run in a network namespace with its own address on a private bridge
(cli/netns.py), as if on separate hosts; the test process is the client and reaches the controllers (and, to
observe, Redis) through the bridge. The workers run the scripted engine (workers/scripted.py), a deterministic fake
engine for fault tests of the broker, not a model, so every reply is known word for word.

The scenario: w1 and w2 are filled with long streams, then w3 starts and serves a steady flow of short requests
alone. At a moment when w3 holds both a streaming job and a claimed job that has not streamed yet, its port on the
bridge goes down for PARTITION_S seconds: w3 keeps running, but nothing it sends reaches Redis and nothing comes
back (what it sent just before is retransmitted by TCP after the heal). Then:
- every stream w3 had started ends with an `error` event whose code is `worker_lost`, within
  WORKER_LOST_BOUND_S of the cut, and its job's record stays failed;
- every job w3 had claimed but not started is served by another worker: `done`, word for word;
- no stream another worker owns receives anything from w3 after the heal: on the job's channel (observed on Redis
  itself) token seqs run 1, 2, ... n, one `done` comes last, nothing follows it, and its text is the tokens joined
  and the scripted reply;
- after the heal w3 registers again (its key is back), holds nothing stale, and serves new jobs alone.
Skipped, with the reason, where network namespaces cannot be made (not root, no iproute2, no permission).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from bench.channel_log import ChannelLog
from bench.chaos_partition import held
from bench.load_checks import MODEL, Arrival, check_stream, load_request, scripted_reply
from cli.netns import Host, Network, unavailable_reason
from cli.processes import Proc, cli, env_for
from contract import jobs, keys
from contract.client import aiter_events
from contract.messages import ClaimState, DoneEvent, ErrorEvent, StreamEvent, TokenEvent
from infra.embedded_redis import redis_server_binary
from infra.redis import connect

pytestmark = [pytest.mark.slow, pytest.mark.pipeline]

STEP_DELAY_S = 0.05
MAX_BATCH = 4
LONG_TOKENS = 400  # 20 s at STEP_DELAY_S: w1 and w2 stay full until after the cut
FLOW_TOKENS = 4  # short jobs: about one ends on w3 every step, so w3 claims new ones every step
FLOW_IN_FLIGHT = 10  # more than w3's slots: its every claim finds jobs waiting
FINAL_TOKENS = 12
PARTITION_S = 20.0
WORKER_LOST_BOUND_S = 15.0  # the partitioned worker's streams end within this of the cut
STREAM_TIMEOUT_S = 150.0
CUT_ATTEMPTS = 5
REREGISTER_TIMEOUT_S = 60.0
PARTITIONED = "w3"
CONTROLLER_PORT = 10000
REDIS_PORT = 6379
UNSTARTED = {ClaimState.claimed.value, ClaimState.started.value}


# ---- the hosts --------------------------------------------------------------------------------------------------


@pytest.fixture
def network() -> Iterator[Network]:
    """A private bridge; every namespace, veth pair and the bridge are deleted at the end, even on failure."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    net = Network()
    try:
        net.create()
        yield net
    finally:
        leftovers = net.destroy()
    assert not leftovers, f"the test network was not fully removed: {leftovers}"


@dataclass
class System:
    net: Network
    log_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    redis_url: str = ""
    controller_urls: list[str] = field(default_factory=list)

    def start(self, name: str, argv: Callable[[Host], list[str]], env: dict[str, str]) -> Host:
        """A new host named `name`, running `argv(host)` (the argv may name the host's address)."""
        host = self.net.add_host(name)
        self.procs[name] = Proc(name, host.argv(argv(host)), env, self.log_dir)
        return host

    def start_worker(self, name: str) -> Host:
        argv = cli("worker", "--engine", "scripted", "--model-path", MODEL, "--scripted-step-delay", str(STEP_DELAY_S),
                   "--max-batch", str(MAX_BATCH), "--worker-id", name)  # fmt: skip
        return self.start(name, lambda _host: argv, env_for(self.redis_url))

    def host(self, name: str) -> Host:
        return self.net.hosts[name]

    def logs(self, *names: str) -> str:
        return "\n".join(f"--- {n}\n{self.procs[n].log()}" for n in names or self.procs if n in self.procs)

    def stop_all(self) -> None:
        self.net.heal_all()  # a scenario that failed mid-partition leaves no worker draining into a cut link
        # workers, then controllers, then Redis: each one's shutdown may still want the next
        order = [n for n in self.procs if n.startswith("w")] + [n for n in self.procs if n.startswith("controller")]
        for name in [*order, "redis"]:
            if name in self.procs:
                self.procs[name].stop(timeout_s=20)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, system: System) -> None:
    """Wait until `predicate()` holds; fail naming `what` with the processes' logs (or the one that exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in system.procs.values():
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}) waiting for {what}:\n{proc.log()}")
        try:
            if predicate():
                return
        except (httpx.HTTPError, OSError, redis_lib.ConnectionError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{system.logs()}")


@pytest.fixture
def system(network: Network, tmp_path: Path) -> Iterator[System]:
    """Redis, two controllers and w1, w2 (w3 is started by the test), each on a host of its own."""
    system = System(network, tmp_path)
    try:

        def redis_argv(host: Host) -> list[str]:
            return [redis_server_binary(), "--bind", host.address, "--port", str(REDIS_PORT), "--save", "",
                    "--appendonly", "no", "--dir", str(tmp_path), "--protected-mode", "no"]  # fmt: skip

        redis_host = system.start("redis", redis_argv, dict(os.environ))
        system.redis_url = f"redis://{redis_host.address}:{REDIS_PORT}/0"
        wait_for(lambda: connect(system.redis_url).ping(), 30, "redis-server", system)
        for k in (1, 2):

            def controller_argv(host: Host) -> list[str]:
                return cli("controller", "--host", host.address, "--port", str(CONTROLLER_PORT))

            host = system.start(f"controller{k}", controller_argv, env_for(system.redis_url))
            system.controller_urls.append(f"http://{host.address}:{CONTROLLER_PORT}")
        for url in system.controller_urls:
            ready = lambda url=url: httpx.get(f"{url}/readyz", timeout=2, trust_env=False).status_code == 200  # noqa: E731
            wait_for(ready, 60, f"the controller at {url}", system)
        for name in ("w1", "w2"):
            system.start_worker(name)
        client = connect(system.redis_url)
        wait_for(lambda: all(client.exists(keys.worker(n)) for n in ("w1", "w2")), 60, "w1 and w2", system)
        yield system
    finally:
        system.stop_all()


# ---- the client and the observer ----------------------------------------------------------------------------------


@dataclass
class Stream:
    index: int
    tokens: int
    url: str
    job_id: str | None = None
    events: list[Arrival] = field(default_factory=list)
    transport_problem: str | None = None  # no answer, an HTTP error status, or no end within the timeout
    ended: bool = False

    @property
    def final(self) -> StreamEvent | None:
        return self.events[-1][1] if self.events else None

    def problem(self) -> str | None:
        """Why this stream is not a whole, correct `done` (None when it is)."""
        return self.transport_problem or check_stream(self.index, self.tokens, self.events, self.job_id)


async def follow(client: httpx.AsyncClient, stream: Stream) -> None:
    """Send the stream's request and keep every event with its arrival time until the stream ends."""
    body = load_request(stream.index, stream.tokens).model_dump(mode="json", exclude_none=True)

    async def read() -> None:
        async with client.stream("POST", f"{stream.url}/api/v1/generate", json=body) as response:
            stream.job_id = response.headers.get("x-job-id")
            if response.status_code != 200:
                stream.transport_problem = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return
            async for event in aiter_events(response):
                stream.events.append((time.perf_counter(), event))

    try:
        await asyncio.wait_for(read(), STREAM_TIMEOUT_S)
    except asyncio.TimeoutError:
        stream.transport_problem = f"hung: no end within {STREAM_TIMEOUT_S:g} s after {len(stream.events)} events"
    except httpx.HTTPError as exc:
        stream.transport_problem = f"{type(exc).__name__}: {exc}"
    finally:
        stream.ended = True


def channel_problem(index: int, tokens: int, messages: list[tuple[float, StreamEvent]]) -> str | None:
    """Why a job's channel did not carry exactly one worker's whole answer: token seqs 1..n, one `done` last and
    nothing after it, done text == tokens joined == the scripted reply (None when it did)."""
    events = [event for _, event in messages if isinstance(event, TokenEvent | DoneEvent | ErrorEvent)]
    finals = [k for k, event in enumerate(events) if not isinstance(event, TokenEvent)]
    if not finals:
        return f"no final event on the channel ({len(events)} token events)"
    if len(finals) > 1 or finals[0] != len(events) - 1:
        after = [f"{type(e).__name__}(seq={getattr(e, 'seq', '-')}, {getattr(e, 'text', '')[:30]!r})"
                 for e in events[finals[0] + 1 :]]  # fmt: skip
        return f"{len(after)} message(s) after the final event {events[finals[0]].type}: {after[:6]}"
    done = events[-1]
    if not isinstance(done, DoneEvent):
        return f"the channel ended with {done.type}, not done"
    token_events = [e for e in events if isinstance(e, TokenEvent)]
    seqs = [e.seq for e in token_events]
    if seqs != list(range(1, len(seqs) + 1)):
        return f"token seqs on the channel are not 1..{len(seqs)}: {seqs[:40]}"
    joined = "".join(e.text for e in token_events)
    if done.text != joined or joined != scripted_reply(index, tokens):
        return f"channel text {joined[:60]!r}, done text {done.text[:60]!r}, scripted {scripted_reply(index, tokens)!r}"
    return None


# ---- the scenario -------------------------------------------------------------------------------------------------


def both_kinds(table: dict[str, str]) -> bool:
    values = set(table.values())
    return ClaimState.streaming.value in values and bool(values & UNSTARTED)


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Wait (letting the streams run) until `predicate()` holds; returns when it did (perf_counter)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.perf_counter()


@dataclass
class Run:
    streams: list[Stream] = field(default_factory=list)
    cut_at: float = 0.0
    healed_at: float = 0.0
    cut_attempts: int = 0
    streaming: set[str] = field(default_factory=set)  # w3's jobs that had streamed when it was cut
    unstarted: set[str] = field(default_factory=set)  # w3's jobs claimed (or admitted) with nothing streamed yet
    key_expired_at: float | None = None  # w3's liveness key first seen gone after the cut (perf_counter)
    reregistered_at: float | None = None  # then first seen back
    final_streams: list[Stream] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def by_job(self) -> dict[str, Stream]:
        return {s.job_id: s for s in self.streams + self.final_streams if s.job_id}


async def watch_registration(redis, run: Run) -> None:
    """Note when w3's liveness key expires after the cut, and when it comes back."""
    exists = lambda: bool(redis.exists(keys.worker(PARTITIONED)))  # noqa: E731
    try:
        run.key_expired_at = await until(lambda: not exists(), PARTITION_S, f"{PARTITIONED}'s key to expire")
        run.reregistered_at = await until(exists, PARTITION_S + REREGISTER_TIMEOUT_S, f"{PARTITIONED}'s key")
    except AssertionError:
        pass  # judged from what was noted


async def settled(redis, worker_id: str) -> dict[str, str]:
    """`held()` once two reads 0.25 s apart agree: Redis has run whatever reached it before the cut."""
    previous = held(redis, worker_id)
    for _ in range(12):
        await asyncio.sleep(0.25)
        current = held(redis, worker_id)
        if current == previous:
            return current
        previous = current
    return previous


async def partition_scenario(system: System, observer: ChannelLog) -> Run:
    redis = connect(system.redis_url)
    run = Run()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    timeout = httpx.Timeout(connect=10.0, read=STREAM_TIMEOUT_S, write=30.0, pool=30.0)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        tasks: list[asyncio.Task[None]] = []

        def launch(tokens: int, into: list[Stream]) -> Stream:
            index = len(run.streams) + len(run.final_streams)
            stream = Stream(index, tokens, system.controller_urls[index % 2])
            into.append(stream)
            tasks.append(asyncio.create_task(follow(client, stream)))
            return stream

        # w1 and w2 full of long streams, so that w3 alone serves the flow and claims at every step
        for _ in range(2 * MAX_BATCH):
            launch(LONG_TOKENS, run.streams)
        full = lambda: all(len(held(redis, w)) == MAX_BATCH for w in ("w1", "w2"))  # noqa: E731
        await until(full, 60, "w1 and w2 to hold their long streams")
        host = await asyncio.to_thread(system.start_worker, PARTITIONED)
        await until(lambda: bool(redis.exists(keys.worker(PARTITIONED))), 60, f"{PARTITIONED} to register")

        flowing = True

        async def flow() -> None:
            flow_streams: list[Stream] = []
            while flowing:
                while sum(not s.ended for s in flow_streams) < FLOW_IN_FLIGHT:
                    flow_streams.append(launch(FLOW_TOKENS, run.streams))
                await asyncio.sleep(0.01)

        flow_task = asyncio.create_task(flow())
        for attempt in range(1, CUT_ATTEMPTS + 1):
            run.cut_attempts = attempt
            await until(lambda: both_kinds(held(redis, PARTITIONED)), 60, f"{PARTITIONED} to hold both kinds of job")
            run.cut_at = time.perf_counter()
            system.net.cut(host)
            table = await settled(redis, PARTITIONED)
            if both_kinds(table):
                break
            system.net.heal(host)  # missed the moment by a step: a cut shorter than a heartbeat changes nothing
        else:
            raise AssertionError(f"{PARTITIONED} was never cut off holding both kinds of job: last {table}")
        flowing = False
        await flow_task
        run.streaming = {j for j, state in table.items() if state == ClaimState.streaming.value}
        run.unstarted = {j for j, state in table.items() if state in UNSTARTED}

        registration = asyncio.create_task(watch_registration(redis, run))
        await asyncio.sleep(max(0.0, run.cut_at + PARTITION_S - time.perf_counter()))  # the partition itself
        system.net.heal(host)
        run.healed_at = time.perf_counter()

        await asyncio.gather(*tasks)
        await registration
        if run.key_expired_at is None:
            run.problems.append(f"{PARTITIONED}'s key never expired during the {PARTITION_S:g} s partition")
        elif run.reregistered_at is None:
            run.problems.append(f"{PARTITIONED}'s key did not come back within {REREGISTER_TIMEOUT_S:g} s of the heal")
        elif run.reregistered_at < run.healed_at:
            run.problems.append(f"{PARTITIONED} registered again before the heal: the partition did not hold")
        if not system.procs[PARTITIONED].alive():
            run.problems.append(f"{PARTITIONED} exited ({system.procs[PARTITIONED].popen.returncode}) after the heal")
        if run.reregistered_at is not None and system.procs[PARTITIONED].alive():
            # w3 alone: new jobs can only be served by it
            for name in ("w1", "w2"):
                await asyncio.to_thread(system.procs[name].stop)
            for _ in range(MAX_BATCH):
                launch(FINAL_TOKENS, run.final_streams)
            await asyncio.gather(*tasks)
            try:
                await until(lambda: not held(redis, PARTITIONED), 30, f"{PARTITIONED} to hold nothing")
            except AssertionError:
                run.problems.append(f"{PARTITIONED} still holds {held(redis, PARTITIONED)} after its last job")
    # pub/sub keeps order: once the observer has this marker, it has every message published before it
    observer.publish_marker()
    await until(observer.caught_up, 30, "the observer to catch up")
    return run


def record_of(redis, job_id: str) -> str:
    """A job record in a few words: `failed worker_lost`, or `finished length by w1` (status, then the error code
    or the finish reason and the worker that wrote the outcome)."""
    view = jobs.view(redis, job_id)
    if view is None:
        return "nothing (no record)"
    outcome = view.outcome
    if outcome is None:
        return f"{view.status} (no outcome)"
    if outcome.error is not None:
        return f"{view.status} {outcome.error.code}"
    reason = outcome.finish_reason.value if outcome.finish_reason else None
    return f"{view.status} {reason} by {outcome.worker_id}"


def judge(run: Run, redis, observer: ChannelLog) -> None:
    """Every expectation of the scenario, each failure added to `run.problems` with its evidence."""
    by_job = run.by_job()
    if not run.streaming or not run.unstarted:
        run.problems.append(f"the cut did not catch both kinds of job: streaming {run.streaming}, {run.unstarted}")
    for stream in run.streams + run.final_streams:
        if stream.job_id is None:
            run.problems.append(f"stream {stream.index}: no job id ({stream.transport_problem})")
    latencies = []
    for job_id in sorted(run.streaming):
        stream = by_job.get(job_id)
        final = stream.final if stream else None
        if stream is None:
            run.problems.append(f"streaming job {job_id}: not one of this test's streams")
        elif not isinstance(final, ErrorEvent) or final.code != "worker_lost":
            run.problems.append(f"w3's streaming job {job_id} (stream {stream.index}) ended with {final!r}, "
                                f"{stream.transport_problem or ''}, not a worker_lost error")  # fmt: skip
        else:
            latency = stream.events[-1][0] - run.cut_at
            latencies.append(latency)
            if latency > WORKER_LOST_BOUND_S:
                run.problems.append(
                    f"job {job_id}: worker_lost {latency:.1f} s after the cut (> {WORKER_LOST_BOUND_S})"
                )
        if (record := record_of(redis, job_id)) != "failed worker_lost":
            run.problems.append(f"w3's streaming job {job_id}: the record says {record}, after the client was told "
                                "worker_lost")  # fmt: skip
        late = [event for at, event in observer.of(job_id) if at > run.healed_at]
        if late:
            run.notes.append(f"after the heal, w3's ended stream {job_id} got {len(late)} more message(s): "
                             f"{[(e.type, getattr(e, 'seq', None)) for e in late[:6]]}")  # fmt: skip
    for job_id in sorted(run.unstarted):
        stream = by_job.get(job_id)
        if stream is None:
            run.problems.append(f"unstarted job {job_id}: not one of this test's streams")
            continue
        if problem := stream.problem():
            run.problems.append(f"w3's unstarted job {job_id} (stream {stream.index}): {problem}")
        if problem := channel_problem(stream.index, stream.tokens, observer.of(job_id)):
            run.problems.append(f"w3's unstarted job {job_id} (stream {stream.index}), on its channel: {problem}")
        record = record_of(redis, job_id)
        if not record.startswith("finished") or record.endswith(f"by {PARTITIONED}"):
            run.problems.append(f"w3's unstarted job {job_id}: the record says {record}, not finished by another "
                                "worker")  # fmt: skip
    for stream in run.streams:
        if stream.job_id in run.streaming or stream.job_id in run.unstarted:
            continue
        if problem := stream.problem():
            run.problems.append(f"stream {stream.index} ({stream.tokens} tokens, job {stream.job_id}): {problem}")
    for stream in run.final_streams:
        record = record_of(redis, stream.job_id) if stream.job_id else "no job"
        if problem := stream.problem() or (None if record.endswith(f"by {PARTITIONED}") else f"record: {record}"):
            run.problems.append(f"new job after the heal, stream {stream.index}: {problem}")
    if run.reregistered_at is not None and not run.final_streams:
        run.problems.append("no new job was sent to w3 after the heal")
    if queued := jobs.queue_depth(redis, MODEL):
        run.problems.append(f"{queued} job(s) left in the queue")
    latency_text = ", ".join(f"{s:.1f}" for s in sorted(latencies)) or "none"
    expired = f"{run.key_expired_at - run.cut_at:.1f} s" if run.key_expired_at is not None else "never"
    back = run.reregistered_at
    reregistered = f"{back - run.healed_at:.1f} s after the heal" if back is not None else "never"
    run.notes.insert(0, f"cut attempts {run.cut_attempts}; w3 held {len(run.streaming)} streaming and "
                        f"{len(run.unstarted)} unstarted job(s); cut to worker_lost (s): {latency_text}; "
                        f"w3's key expired {expired} after the cut, came back {reregistered}; "
                        f"{len(run.streams)} streams + {len(run.final_streams)} after the heal")  # fmt: skip


def test_a_worker_partitioned_from_redis_loses_its_streams_its_queue_moves_on_and_it_comes_back_clean(
    system: System,
) -> None:
    observer = ChannelLog(system.redis_url)
    observer.start()
    try:
        run = asyncio.run(partition_scenario(system, observer))
    except AssertionError as exc:  # the scenario could not be played out: say where, with every log
        pytest.fail(f"{exc}\n{system.logs()}", pytrace=False)
    finally:
        observer.stop()
    judge(run, connect(system.redis_url), observer)
    print("\n".join(["partition:", *run.notes]))
    if run.problems:
        pytest.fail("\n".join([*run.problems, *run.notes, system.logs(PARTITIONED)]), pytrace=False)
