"""Pieces shared by the benchmarks: request content, percentiles, a served system of real processes."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from contract.messages import DoneEvent, ErrorEvent, GenerateRequest, TokenEvent

COLORS = ["red", "green", "blue", "orange", "purple", "yellow", "black", "cyan"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def png_bytes(i: int) -> bytes:
    image = Image.new("RGB", (128, 128), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((20 + i % 5 * 4, 24, 100, 104 - i % 3 * 6), fill=COLORS[i % len(COLORS)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def question(i: int) -> str:
    return f"Request {i}: what colour is the shape in this picture, and where is it?"


def generate_request(model: str, i: int, max_new_tokens: int) -> GenerateRequest:
    """Request `i`: one image and a question, greedy."""
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(i)).decode()
    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": question(i)}]
    return GenerateRequest.model_validate({
        "model": model, "messages": [{"role": "user", "content": content}],
        "temperature": 0.0, "max_new_tokens": max_new_tokens,
    })  # fmt: skip


@dataclass
class StreamRun:
    """What the clients of one closed-loop run saw."""

    ttfts: list[float]  # seconds from sending a request to its first token event
    gaps: list[float]  # seconds between consecutive token events of a stream
    completion_tokens: int
    wall_s: float


def closed_loop_sse(url: str, model: str, streams: int, requests: int, max_new_tokens: int) -> StreamRun:
    """`streams` clients stream `requests` requests back to back through the controller's SSE API."""
    from contract.client import ControllerClient

    lock = threading.Lock()
    counter = iter(range(requests))
    run = StreamRun([], [], 0, 0.0)

    def client_loop() -> None:
        client = ControllerClient(url)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                sent = time.perf_counter()
                arrivals: list[float] = []
                done = 0
                for event in client.generate(generate_request(model, i, max_new_tokens)):
                    if isinstance(event, TokenEvent):
                        arrivals.append(time.perf_counter())
                    elif isinstance(event, DoneEvent):
                        done = event.usage.completion_tokens
                    elif isinstance(event, ErrorEvent):
                        raise RuntimeError(f"request {i} failed: {event.code}: {event.message}")
                with lock:
                    run.completion_tokens += done
                    run.ttfts.append((arrivals[0] if arrivals else time.perf_counter()) - sent)
                    run.gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        for future in [pool.submit(client_loop) for _ in range(streams)]:
            future.result()
    run.wall_s = time.perf_counter() - start
    return run


def stream_once(url: str, body: GenerateRequest) -> None:
    """Stream one request to its end (warm-up); raise on an error event."""
    from contract.client import ControllerClient

    client = ControllerClient(url)
    try:
        for event in client.generate(body):
            if isinstance(event, ErrorEvent):
                raise RuntimeError(f"warm-up request failed: {event.code}: {event.message}")
    finally:
        client.close()


def served_system(
    model_path: str,
    max_batch: int,
    workdir: Path,
    *worker_args: str,
    timeout_s: float = 180,
    threads: int | None = None,
):
    """Embedded Redis, a controller and one worker, as `llava-serve up` would run them; `threads` sets the
    worker's OMP_NUM_THREADS (None: inherit)."""
    from cli.processes import start_controller, start_worker, wait_for_workers
    from infra.embedded_redis import EmbeddedRedis

    redis = EmbeddedRedis(workdir / "redis", persist=False).start()
    procs = []
    try:
        controller, url = start_controller(redis.url, workdir)
        procs.append(controller)
        with _omp_threads(threads):  # the worker inherits the environment at start
            worker = start_worker(redis.url, workdir, f"worker-b{max_batch}", "--model-path", model_path,
                                  "--max-batch", str(max_batch), *worker_args)  # fmt: skip
        procs.append(worker)
        wait_for_workers(url, Path(model_path).name, 1, procs, timeout_s=timeout_s)
    except BaseException:
        stop_system(redis, procs)
        raise
    return redis, procs, url


@contextlib.contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def stop_system(redis, procs) -> None:
    for proc in reversed(procs):
        proc.stop()
    redis.stop()
