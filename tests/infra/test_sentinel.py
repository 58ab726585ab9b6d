"""Redis Sentinel: `redis+sentinel://` URLs, and a failover under load with real processes.

The failover test starts a master, a replica and three sentinels (redis-server in sentinel mode), a controller and a
scripted worker (workers/scripted.py: a deterministic fake engine for fault tests, not a model) connected through
the Sentinel URL, kills the master with SIGKILL while streams run, and checks that every stream ends with `done` or
`error` and that the same processes serve new requests once a sentinel has promoted the replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from bench.load import start_scripted_system, stop_processes
from bench.load_checks import check_stream, load_request
from cli.processes import wait_for_workers, wait_until
from contract.client import aiter_events
from contract.messages import DoneEvent, ErrorEvent, StreamEvent, TokenEvent
from infra.embedded_redis import free_port, redis_server_binary
from infra.process import die_with_parent
from infra.redis import async_connect, connect, parse_sentinel_url, private_copy

SERVICE = "llava-test"


# ---- the URL ------------------------------------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_service_the_database_and_the_passwords() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:s%40cret@10.0.0.1:26380,sentinel-b/mymaster/2?sentinel_password=x")
    assert parsed.sentinels == [("10.0.0.1", 26380), ("sentinel-b", 26379)]
    assert (parsed.service_name, parsed.db) == ("mymaster", 2)
    assert (parsed.username, parsed.password, parsed.sentinel_password) == (None, "s@cret", "x")

    plain = parse_sentinel_url("redis+sentinel://user:pw@h1:1,h2:2/svc")
    assert (plain.sentinels, plain.service_name, plain.db) == ([("h1", 1), ("h2", 2)], "svc", 0)
    assert (plain.username, plain.password, plain.sentinel_password) == ("user", "pw", None)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h1:26379", "service_name"),
        ("redis+sentinel://h1:26379/svc/zero", "database"),
        ("redis+sentinel://h1:port/svc", "port"),
        ("redis+sentinel://h1,,h2/svc", "empty sentinel"),
        ("redis+sentinel://h1/svc?socket_timeout=1", "unknown option"),
        ("redis://h1/0", r"not a redis\+sentinel"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_with_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_sentinel_url(url)


# ---- a master, a replica and three sentinels -------------------------------------------------------------------


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Node:
    """One redis-server (a data node, or a sentinel when `sentinel_config` is given) on a free loopback port."""

    def __init__(self, workdir: Path, name: str, *args: str, sentinel_config: str | None = None) -> None:
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        base = ["--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir), "--save", "",
                "--appendonly", "no", "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        argv = [redis_server_binary()]
        if sentinel_config is not None:
            config = self.dir / "sentinel.conf"  # a sentinel rewrites its config file: one each, writable
            config.write_text(sentinel_config)
            argv += [str(config), "--sentinel"]
        self.process = subprocess.Popen([*argv, *base, *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        preexec_fn=die_with_parent)  # fmt: skip

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def wait_answering(self, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while not _answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class SentinelCluster:
    def __init__(self, workdir: Path) -> None:
        self.master = Node(workdir, "master")
        self.master.wait_answering()
        self.replica = Node(workdir, "replica", "--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.wait_answering()
        config = (f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                  f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                  f"sentinel failover-timeout {SERVICE} 10000\n")  # fmt: skip
        self.sentinels = [Node(workdir, f"sentinel-{k}", sentinel_config=config) for k in range(3)]
        for sentinel in self.sentinels:
            try:
                sentinel.wait_answering()
            except RuntimeError as exc:
                self.stop()
                pytest.skip(f"this redis-server cannot run as a sentinel ({redis_server_binary()}): {exc}")
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        self.url = f"redis+sentinel://{nodes}/{SERVICE}/0"

    def master_state(self) -> dict:
        return redis.Redis(port=self.sentinels[0].port, decode_responses=True).sentinel_master(SERVICE)

    def wait_ready(self) -> None:
        """Until the replica is in sync and every sentinel knows the replica and the two other sentinels."""

        def ready() -> bool:
            info = redis.Redis(port=self.replica.port).info("replication")
            if info.get("master_link_status") != "up":
                return False
            for sentinel in self.sentinels:
                state = redis.Redis(port=sentinel.port, decode_responses=True).sentinel_master(SERVICE)
                if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                    return False
            return True

        wait_until(ready, 30, "the replica in sync and three sentinels that know each other")

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(tmp_path / "redis")
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def test_sync_and_async_clients_reach_the_master_through_the_sentinels(cluster: SentinelCluster) -> None:
    client = connect(cluster.url, decode_responses=True)
    client.set("llava:test:sentinel", "written", ex=30)
    assert redis.Redis(port=cluster.master.port).get("llava:test:sentinel") == b"written"
    assert private_copy(client).get("llava:test:sentinel") == "written"  # the heartbeat's own pool
    client.close()

    async def read() -> bytes | None:
        aclient = async_connect(cluster.url)
        try:
            return await aclient.get("llava:test:sentinel")
        finally:
            await aclient.aclose()

    assert asyncio.run(read()) == b"written"


def test_an_async_burst_past_the_pool_size_waits_through_the_sentinels(cluster: SentinelCluster) -> None:
    async def burst() -> list:
        client = async_connect(cluster.url)
        try:
            return await asyncio.gather(*(client.blpop([f"llava:test:burst:{i}"], timeout=0.2) for i in range(300)))
        finally:
            await client.aclose()

    assert asyncio.run(burst()) == [None] * 300  # 300 held connections, more than the pool's 128: they wait


# ---- a failover under load ----------------------------------------------------------------------------------------

STREAMS = 6
TOKENS = 300  # at 0.05 s a step: 15 s a stream, still running when the master dies
STEP_DELAY_S = 0.05
STREAM_LIMIT_S = 90  # a stream with no end by then hangs


async def _follow(client: httpx.AsyncClient, index: int, tokens: int, events: list[StreamEvent]) -> str | None:
    body = load_request(index, tokens).model_dump(mode="json", exclude_none=True)
    async with client.stream("POST", "/api/v1/generate", json=body) as response:
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
        async for event in aiter_events(response):
            events.append(event)
    return None


async def _streams_through_a_master_kill(url: str, cluster: SentinelCluster) -> list[tuple[str | None, list]]:
    events: list[list[StreamEvent]] = [[] for _ in range(STREAMS)]
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(STREAM_LIMIT_S)) as client:
        tasks = [asyncio.ensure_future(_follow(client, i, TOKENS, events[i])) for i in range(STREAMS)]
        deadline = time.monotonic() + 60
        while not all(any(isinstance(e, TokenEvent) for e in stream) for stream in events):
            if time.monotonic() > deadline or any(t.done() for t in tasks):
                raise AssertionError(f"streams did not all start: {[len(s) for s in events]}")
            await asyncio.sleep(0.05)
        os.kill(cluster.master.process.pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*(asyncio.wait_for(t, STREAM_LIMIT_S) for t in tasks), return_exceptions=True)
    return [(None if o is None else repr(o), stream) for o, stream in zip(outcomes, events, strict=True)]


@pytest.mark.pipeline
def test_a_master_killed_under_load_ends_every_stream_and_the_promoted_replica_serves(
    cluster: SentinelCluster, tmp_path: Path
) -> None:
    procs, url = start_scripted_system(cluster.url, tmp_path, workers=1, max_batch=16, max_queue=64,
                                       step_delay_s=STEP_DELAY_S)  # fmt: skip
    try:
        results = asyncio.run(_streams_through_a_master_kill(url, cluster))

        for index, (problem, events) in enumerate(results):
            assert problem is None, f"stream {index} did not end: {problem} after {len(events)} events"
            finals = [e for e in events if isinstance(e, DoneEvent | ErrorEvent)]
            assert len(finals) == 1 and events[-1] is finals[0], f"stream {index}: {[e.type for e in events[-3:]]}"

        def promoted() -> bool:
            state = cluster.master_state()
            return (state["ip"], int(state["port"])) == ("127.0.0.1", cluster.replica.port)

        wait_until(promoted, 30, "a sentinel to promote the replica")
        wait_for_workers(url, "scripted-load", 1, procs, timeout_s=30)

        async def one_stream() -> str | None:
            events: list[StreamEvent] = []
            async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60)) as client:
                problem = await asyncio.wait_for(_follow(client, 100, 8, events), 60)
            return problem or check_stream(100, 8, [(0.0, e) for e in events], events[0].job_id if events else None)

        assert asyncio.run(one_stream()) is None  # the same controller and worker, no restart
        assert all(proc.alive() for proc in procs)
    finally:
        stop_processes(procs)
