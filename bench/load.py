"""A thousand concurrent SSE streams through one controller process, every event checked.

    python -m bench.load [--streams 1000] [--workers 4] [--max-batch 256] [--tokens 32] [--step-delay-s 0.05]
                         [--stream-timeout 120] [--out bench/results/load.json]

Real processes: an embedded redis-server, one `llava-serve controller` (`--max-queue` raised to `--streams`, so
that admission control does not turn the burst away) and `--workers` workers started with `--engine scripted`.
The scripted engine (workers/scripted.py) is a deterministic fake engine for load and fault tests of the broker,
NOT a model: it replies with the words of the prompt, cycled, one word per decode step every `--step-delay-s`
seconds, and `[[tokens=N]]` in the prompt makes the reply exactly N tokens. One asyncio httpx client opens all
`--streams` `POST /api/v1/generate` streams at once. A stream passes when it ends with `done` whose text is the
concatenation of its `token` events, is the scripted reply of its own prompt, and counts `--tokens` completion
tokens, with `token` seq 1, 2, 3, ... and no `error` and no hang (`--stream-timeout`). Measures: streams completed
and failed, wall time and its ratio to the ideal (waves of `workers x max-batch` streams x tokens x step delay),
token events/s, TTFT and inter-token p50/p99, the controller's peak RSS and CPU seconds, Redis' peak
connected_clients and used_memory. Prints a table and writes JSON (default bench/results/load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import percentile
from bench.load_checks import ENGINE_NOTE, MODEL, Arrival, StreamResult, check_stream, leftover_jobs, load_request
from cli.processes import Proc, cli, env_for, start_controller, wait_for_workers
from contract.client import aiter_events, error_from_response
from contract.messages import TokenEvent
from workers.cli import SCRIPTED_STEP_DELAY_S

# ---- the client: every stream at once --------------------------------------------------------------------------


async def _read_events(response: httpx.Response, events: list[Arrival]) -> None:
    """Append each SSE event's (arrival time, typed event) to `events` until the server ends the stream."""
    async for event in aiter_events(response):
        events.append((time.perf_counter(), event))


async def run_stream(client: httpx.AsyncClient, body: dict, index: int, tokens: int, timeout: float) -> StreamResult:
    """Stream request `index` (`body`) to its end (or `timeout` seconds) and check what came back."""
    events: list[Arrival] = []
    header_job_id = None
    sent = time.perf_counter()

    async def follow() -> str | None:
        nonlocal header_job_id
        async with client.stream("POST", "/api/v1/generate", json=body) as response:
            header_job_id = response.headers.get("x-job-id")
            if response.status_code != 200:
                await response.aread()
                error = error_from_response(response)
                return f"HTTP {response.status_code}: {error.code}: {error.message[:300]}"
            await _read_events(response, events)
        return None

    try:
        problem: str | None = await asyncio.wait_for(follow(), timeout)
    except asyncio.TimeoutError:
        problem = f"hung: no end within {timeout:g} s after {len(events)} events"
    except httpx.HTTPError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        problem = check_stream(index, tokens, events, header_job_id)
    arrivals = [at for at, event in events if isinstance(event, TokenEvent)]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]  # noqa: B905 - one shorter by design
    return StreamResult(index, header_job_id, problem, len(arrivals), arrivals[0] - sent if arrivals else None, gaps)


@dataclass
class LoadRun:
    results: list[StreamResult]
    wall_s: float

    @property
    def failures(self) -> list[StreamResult]:
        return [r for r in self.results if r.problem is not None]


async def run_streams(url: str | list[str], streams: int, tokens: int, timeout: float, first: int = 0) -> LoadRun:
    """Open `streams` streams at once (requests `first` .. `first + streams - 1`); with several controller URLs,
    round robin: request `first + k` goes to `url[k % len(url)]`, one client per controller."""
    # No keep-alive: httpcore's pool counts all connections for every idle one each time a request starts or ends,
    # cubic in the streams (90 streams under cProfile: 2.4 s of client CPU with it, 1.3 s without); none is reused.
    limits = httpx.Limits(max_connections=streams + 16, max_keepalive_connections=0)
    http_timeout = httpx.Timeout(connect=60.0, read=timeout, write=60.0, pool=60.0)
    indices = range(first, first + streams)
    bodies = [load_request(i, tokens).model_dump(mode="json", exclude_none=True) for i in indices]
    urls = [url] if isinstance(url, str) else url
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=u, limits=limits, timeout=http_timeout))
                   for u in urls]  # fmt: skip
        start = time.perf_counter()
        streaming = [run_stream(clients[k % len(clients)], body, i, tokens, timeout)
                     for k, (body, i) in enumerate(zip(bodies, indices, strict=True))]  # fmt: skip
        results = await asyncio.gather(*streaming)
        wall = time.perf_counter() - start
    return LoadRun(list(results), wall)


def open_streams(url: str | list[str], streams: int, tokens: int, timeout: float, first: int = 0) -> LoadRun:
    """`run_streams` from synchronous code, after raising the open-files limit to fit the streams."""
    raise_open_files_limit(streams)
    return asyncio.run(run_streams(url, streams, tokens, timeout, first))


def raise_open_files_limit(streams: int) -> int:
    """Raise the soft RLIMIT_NOFILE (inherited by processes started later) to fit a socket per stream on the
    client and two on the controller (client side and a Redis connection at worst); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * streams + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


# ---- the system under load ------------------------------------------------------------------------------------


def start_scripted_system(
    redis_url: str, log_dir: Path, *, workers: int, max_batch: int, max_queue: int, step_delay_s: float | None = None
) -> tuple[list[Proc], str]:
    """One controller and `workers` workers on the scripted engine (a fake engine, not a model) serving MODEL;
    returns the processes (controller first) and the controller's URL once every worker is live."""
    procs, urls = start_scripted_replicas(redis_url, log_dir, controllers=1, workers=workers, max_batch=max_batch,
                                          max_queue=max_queue, step_delay_s=step_delay_s)  # fmt: skip
    return procs, urls[0]


def start_scripted_replicas(
    redis_url: str,
    log_dir: Path,
    *,
    controllers: int,
    workers: int,
    max_batch: int,
    max_queue: int,
    step_delay_s: float | None = None,
) -> tuple[list[Proc], list[str]]:
    """`controllers` controller replicas and `workers` scripted workers on one Redis; returns the processes
    (controllers first, in the order of their URLs) and the controllers' URLs once every worker is live."""
    flags = ["worker", "--engine", "scripted", "--model-path", MODEL, "--max-batch", str(max_batch)]
    if step_delay_s is not None:
        flags += ["--scripted-step-delay-s", str(step_delay_s)]
    argv = cli(*flags)
    # workers first: they need only Redis, and start while the controllers do
    procs = [Proc(f"scripted-worker-{k}", argv, env_for(redis_url), log_dir) for k in range(workers)]
    urls: list[str] = []
    try:
        for k in range(controllers):
            controller, url = start_controller(redis_url, log_dir, "--max-queue", str(max_queue))
            procs.insert(k, controller)
            urls.append(url)
        wait_for_workers(urls[0], MODEL, workers, procs, timeout_s=120)
    except BaseException:
        stop_processes(procs)
        raise
    return procs, urls


def stop_processes(procs: list[Proc]) -> None:
    for proc in reversed(procs):
        proc.stop()


class ResourceSampler:
    """Peaks of the (first) controller's RSS, open files and threads and of Redis' connected_clients and
    used_memory, sampled every `interval` s in a thread between start() and stop(); `cpu_s`: CPU seconds used
    meanwhile by the controller(s), the workers and this (client) process, and with several controllers by each
    one too (`controller-0`, `controller-1`, ...)."""

    def __init__(self, controller: Proc | list[Proc], workers: list[Proc], redis, interval: float = 0.1) -> None:
        import psutil

        controllers = [psutil.Process(c.pid) for c in (controller if isinstance(controller, list) else [controller])]
        self.controller, self.redis, self.interval = controllers[0], redis, interval
        self.groups = {"controller": controllers, "workers": [psutil.Process(w.pid) for w in workers],
                       "client": [psutil.Process()]}  # fmt: skip
        if len(controllers) > 1:
            self.groups |= {f"controller-{k}": [c] for k, c in enumerate(controllers)}
        self.peaks: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _cpu(self) -> dict[str, float]:
        return {name: sum(sum(p.cpu_times()[:2]) for p in group) for name, group in self.groups.items()}

    def _sample(self) -> None:
        info = self.redis.info()
        now = {"rss_bytes": self.controller.memory_info().rss, "open_files": self.controller.num_fds(),
               "threads": self.controller.num_threads(), "redis_clients": int(info["connected_clients"]),
               "redis_used_memory": int(info["used_memory"])}  # fmt: skip
        self.peaks |= Counter(now)  # `|` keeps the larger count of each

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> ResourceSampler:
        self._cpu_start = self._cpu()
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_s = {name: round(cpu - self._cpu_start[name], 2) for name, cpu in self._cpu().items()}


# ---- the benchmark ----------------------------------------------------------------------------------------------


def ideal_wall_s(streams: int, workers: int, max_batch: int, tokens: int, step_delay_s: float) -> float:
    """The scripted engine's own time: waves of `workers x max_batch` streams, each `tokens` steps long."""
    return math.ceil(streams / (workers * max_batch)) * tokens * step_delay_s


def summarise(run: LoadRun, sampler: ResourceSampler, ideal: float) -> dict:
    ttfts = [r.ttft for r in run.results if r.ttft is not None]
    gaps = [g for r in run.results for g in r.gaps]
    events = sum(r.token_events for r in run.results)
    peaks, cpu, mib = sampler.peaks, sampler.cpu_s, 2**20
    return {
        "streams": len(run.results), "completed": len(run.results) - len(run.failures), "failed": len(run.failures),
        "wall_s": round(run.wall_s, 3), "ideal_s": round(ideal, 3), "wall_over_ideal": round(run.wall_s / ideal, 2),
        "token_events": events, "token_events_per_s": round(events / run.wall_s, 1),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1), "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1),
        "itl_p50_ms": round(percentile(gaps, 50) * 1000, 1), "itl_p99_ms": round(percentile(gaps, 99) * 1000, 1),
        "controller_peak_rss_mb": round(peaks["rss_bytes"] / mib, 1), "controller_cpu_s": cpu["controller"],
        "controller_peak_open_files": peaks["open_files"], "controller_peak_threads": peaks["threads"],
        "redis_peak_connected_clients": peaks["redis_clients"],
        "redis_peak_used_memory_mb": round(peaks["redis_used_memory"] / mib, 2),
        "workers_cpu_s": cpu["workers"], "client_cpu_s": cpu["client"],
    }  # fmt: skip


def problem_counts(run: LoadRun) -> dict[str, int]:
    """How many streams failed with each problem, most frequent first."""
    return dict(Counter(str(failure.problem) for failure in run.failures).most_common())


def print_table(row: dict) -> None:
    print("| measure | value |\n|---|---|")
    for name, value in row.items():
        print(f"| {name} | {value} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams, all opened at once")
    parser.add_argument("--workers", type=int, default=4, help="scripted workers (a fake engine, not a model)")
    parser.add_argument("--max-batch", type=int, default=256, help="each worker's --max-batch")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per reply (max_new_tokens and the marker)")
    parser.add_argument("--step-delay-s", type=float, default=SCRIPTED_STEP_DELAY_S,
                        help="seconds per scripted decode step (default: the worker CLI's)")  # fmt: skip
    parser.add_argument("--stream-timeout", type=float, default=120.0, help="a stream not ended by then hangs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args(argv)

    from infra.embedded_redis import EmbeddedRedis
    from infra.redis import connect

    open_files = raise_open_files_limit(args.streams)  # before starting anything: children inherit it
    workdir = Path(tempfile.mkdtemp(prefix="llava-bench-load-"))
    load_before = os.getloadavg()
    redis_server = EmbeddedRedis(workdir / "redis", persist=False).start()
    redis = connect(redis_server.url)
    procs: list[Proc] = []
    try:
        procs, url = start_scripted_system(redis_server.url, workdir, workers=args.workers, max_batch=args.max_batch,
                                           max_queue=args.streams, step_delay_s=args.step_delay_s)  # fmt: skip
        print(f"{args.streams} streams, {args.workers} workers x max batch {args.max_batch}, {args.tokens} tokens, "
              f"step delay {args.step_delay_s} s, engine {ENGINE_NOTE}; logs in {workdir}", flush=True)  # fmt: skip
        warm = open_streams(url, 1, args.tokens, args.stream_timeout, first=-1)
        if warm.failures:
            raise RuntimeError(f"warm-up stream failed: {warm.failures[0].problem}")
        sampler = ResourceSampler(procs[0], procs[1:], redis).start()
        run = open_streams(url, args.streams, args.tokens, args.stream_timeout)
        sampler.stop()
        load_after = os.getloadavg()
        left = leftover_jobs(redis, [r.job_id for r in run.results if r.job_id])
    finally:
        stop_processes(procs)
        redis.close()
        redis_server.stop()

    ideal = ideal_wall_s(args.streams, args.workers, args.max_batch, args.tokens, args.step_delay_s)
    row = summarise(run, sampler, ideal)
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs); "
          f"open-files limit {open_files}\n")  # fmt: skip
    print_table(row)
    for problem, count in problem_counts(run).items():
        print(f"  {count} stream(s): {problem}")
    print(f"left in Redis: {'; '.join(left) if left else 'nothing'}")
    report = {
        "engine": ENGINE_NOTE, "streams": args.streams, "workers": args.workers, "max_batch": args.max_batch,
        "tokens": args.tokens, "step_delay_s": args.step_delay_s, "controller_max_queue": args.streams,
        "stream_timeout_s": args.stream_timeout, "cpus": os.cpu_count(), "open_files_limit": open_files,
        "load_average_before": list(load_before), "load_average_after": list(load_after), "result": row,
        "left_in_redis": left, "problems": problem_counts(run),
        "failures": [{"index": f.index, "job_id": f.job_id, "problem": f.problem} for f in run.failures[:50]],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if not run.failures and not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
