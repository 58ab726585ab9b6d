"""One client's heavy requests must not stall another's light ones: latency of short requests, idle and under load.

    python -m bench.heavy [--light 40] [--max-new-tokens 8] [--threads 1] [--out bench/results/heavy.json]

Real processes: an embedded redis-server, one `llava-serve controller` and one worker serving the tiny random-weight
LLaVA built by workers/tiny_model.py, on the CPU. A light client sends `--light` short text requests one after
another (greedy, `--max-new-tokens` tokens) and measures each from sending to its `done` event. It does so twice in
one run: idle, then while two heavy clients (child processes) send back to back: one a 60 MB text prompt (under
the 64 MB body limit; refused by the context bound, `contract.limits`), the other requests of eight distinct
40-megapixel images each (new bytes every request, so no cache helps); the light client then goes on until each
heavy client has finished at least one request. Prints a table (p50, p99, the heavy/idle p50 ratio; target:
within 2x) and the heavy clients' outcomes, and writes JSON (default bench/results/heavy.json).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import os
import struct
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from bench.common import COLORS, percentile, served_system, stop_system, stream_once
from contract.client import ControllerClient
from contract.errors import LlavaError
from contract.messages import DoneEvent, ErrorEvent, GenerateRequest

HUGE_PROMPT_CHARS = 60_000_000
IMAGE_SIZE = (8000, 5000)  # 40 megapixels, the controller's default limit
IMAGES_PER_REQUEST = 8


def text_request(model: str, text: str, max_new_tokens: int) -> GenerateRequest:
    return GenerateRequest.model_validate({
        "model": model, "messages": [{"role": "user", "content": text}],
        "temperature": 0.0, "max_new_tokens": max_new_tokens,
    })  # fmt: skip


def big_pngs() -> list[bytes]:
    """Eight distinct 40-megapixel PNGs (flat colours and a shape: small files, full decoding cost)."""
    pngs = []
    for i in range(IMAGES_PER_REQUEST):
        image = Image.new("RGB", IMAGE_SIZE, "white")
        ImageDraw.Draw(image).rectangle((400 * i, 300, 4000 + 300 * i, 4200), fill=COLORS[i % len(COLORS)])
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        pngs.append(buf.getvalue())
    return pngs


def tagged(png: bytes, tag: str) -> bytes:
    """`png` with a tEXt chunk carrying `tag` after its header: other bytes (a new digest), the same pixels."""
    data = b"bench\0" + tag.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data) & 0xFFFFFFFF)
    header_end = 8 + 25  # signature, then the IHDR chunk (4 length + 4 type + 13 data + 4 crc)
    return png[:header_end] + chunk + png[header_end:]


def images_request(model: str, pngs: list[bytes], round_: int) -> GenerateRequest:
    urls = [
        "data:image/png;base64," + base64.b64encode(tagged(p, f"{round_}-{i}")).decode() for i, p in enumerate(pngs)
    ]
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    content.append({"type": "text", "text": "Describe these pictures."})
    return GenerateRequest.model_validate({
        "model": model, "messages": [{"role": "user", "content": content}], "temperature": 0.0, "max_new_tokens": 4,
    })  # fmt: skip


def outcome(client: ControllerClient, body: GenerateRequest) -> str:
    """How one request ended: `done`, or the error code (before or after the stream started)."""
    try:
        for event in client.generate(body):
            if isinstance(event, DoneEvent):
                return "done"
            if isinstance(event, ErrorEvent):
                return f"error {event.code}"
        return "no final event"
    except LlavaError as exc:
        return f"HTTP {exc.status_code} {exc.code}"


def heavy_loop(url: str, kind: str, model: str, pngs: list[bytes], stop, completed, results) -> None:
    """In its own process (its JSON encoding never competes with the light client's): send `kind` requests back to
    back until `stop` is set, counting them in `completed`, then put (outcome counts, seconds per request) on
    `results`."""
    client = ControllerClient(url)
    huge = text_request(model, "x" * HUGE_PROMPT_CHARS, 4)
    outcomes: Counter[str] = Counter()
    seconds: list[float] = []
    try:
        while not stop.is_set():
            body = huge if kind == "text" else images_request(model, pngs, len(seconds))
            started = time.perf_counter()
            try:
                outcomes[outcome(client, body)] += 1
            except LlavaError as exc:  # an unreachable controller and the like
                outcomes[f"client error {exc.code}"] += 1
            seconds.append(time.perf_counter() - started)
            with completed.get_lock():
                completed.value += 1
    finally:
        client.close()
        results.put((dict(outcomes), seconds))


class HeavyClient:
    """`heavy_loop` in a child process, from `start()` to `stop()`."""

    def __init__(self, url: str, name: str, kind: str, model: str, pngs: list[bytes]) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        self.outcomes: dict[str, int] = {}
        self.seconds: list[float] = []
        self._stop, self._results, self.completed = context.Event(), context.Queue(), context.Value("i", 0)
        args = (url, kind, model, pngs, self._stop, self.completed, self._results)
        self._process = context.Process(target=heavy_loop, args=args, name=f"heavy-{kind}")

    def start(self) -> HeavyClient:
        self._process.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.outcomes, self.seconds = self._results.get(timeout=600)
        self._process.join(timeout=60)


def light_latencies(
    url: str, model: str, count: int, max_new_tokens: int, until=lambda: True
) -> tuple[list[float], Counter[str]]:
    """At least `count` short requests one after another, and more until `until()` is true: seconds from sending
    each to its final event, and outcomes."""
    client = ControllerClient(url)
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    try:
        i = 0
        while i < count or not until():
            i += 1
            started = time.perf_counter()
            outcomes[
                outcome(client, text_request(model, f"Request {i}: hello there, what is this?", max_new_tokens))
            ] += 1
            latencies.append(time.perf_counter() - started)
    finally:
        client.close()
    return latencies, outcomes


class CpuSeconds:
    """CPU seconds the controller and the worker used since the last `lap()` (or creation)."""

    def __init__(self, procs) -> None:
        import psutil

        self._procs = {"controller": psutil.Process(procs[0].pid), "worker": psutil.Process(procs[1].pid)}
        self._last = self._now()

    def _now(self) -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in self._procs.items()}

    def lap(self) -> dict[str, float]:
        now = self._now()
        used = {name: round(now[name] - self._last[name], 1) for name in now}
        self._last = now
        return used


def phase_row(name: str, latencies: list[float], outcomes: Counter[str], cpu: dict[str, float]) -> dict:
    return {"phase": name, "requests": len(latencies), "outcomes": dict(outcomes),
            "p50_ms": round(percentile(latencies, 50) * 1000, 1), "p99_ms": round(percentile(latencies, 99) * 1000, 1),
            "max_ms": round(max(latencies) * 1000, 1), "controller_cpu_s": cpu["controller"],
            "worker_cpu_s": cpu["worker"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heavy", description=__doc__.splitlines()[0])
    parser.add_argument("--light", type=int, default=40, help="light requests per phase, one after another")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens per light request")
    parser.add_argument("--threads", type=int, default=1, help="the worker's torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--heavy", choices=["both", "text", "images"], default="both",
                        help="which heavy clients run in the second phase (one alone isolates its cost)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/heavy.json"))
    args = parser.parse_args(argv)

    from workers.tiny_model import ensure_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="llava-bench-heavy-"))
    model_path = ensure_tiny_model(workdir / "models")
    model = model_path.name
    print(f"building {IMAGES_PER_REQUEST} PNGs of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} ...", flush=True)
    pngs = big_pngs()
    load_before = os.getloadavg()
    redis, procs, url = served_system(str(model_path), 8, workdir, "--threads", str(args.threads), threads=args.threads)
    try:
        print(f"serving {model} on the CPU; logs in {workdir}", flush=True)
        stream_once(url, text_request(model, "warm up", args.max_new_tokens))
        cpu = CpuSeconds(procs)
        idle = light_latencies(url, model, args.light, args.max_new_tokens)
        cpu_idle = cpu.lap()
        heavy = []
        if args.heavy in ("both", "text"):
            heavy.append(HeavyClient(url, "60 MB prompt", "text", model, []).start())
        if args.heavy in ("both", "images"):
            heavy.append(HeavyClient(url, "8 x 40 MP images", "images", model, pngs).start())
        time.sleep(2.0)  # let the heavy requests get going before measuring (a warm-up, not synchronisation)
        # the light client goes on until every heavy client has finished a request: it overlaps their whole cost
        loaded = light_latencies(url, model, args.light, args.max_new_tokens,
                                 until=lambda: all(c.completed.value > 0 for c in heavy))  # fmt: skip
        cpu_loaded = cpu.lap()
        for client in heavy:
            client.stop()
        load_after = os.getloadavg()
    finally:
        stop_system(redis, procs)

    rows = [phase_row("idle", *idle, cpu_idle), phase_row("with heavy clients", *loaded, cpu_loaded)]
    ratio = rows[1]["p50_ms"] / rows[0]["p50_ms"]
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)\n")
    print("| light client | requests | p50 ms | p99 ms | max ms | controller CPU s | worker CPU s | outcomes |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip
    for row in rows:
        print(f"| {row['phase']} | {row['requests']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} | "
              f"{row['controller_cpu_s']} | {row['worker_cpu_s']} | {row['outcomes']} |")  # fmt: skip
    print(f"\np50 with heavy clients / idle: {ratio:.2f}x (target: within 2x)\n")
    print("| heavy client | requests | median s | outcomes |\n|---|---|---|---|")
    for client in heavy:
        print(f"| {client.name} | {len(client.seconds)} | {percentile(client.seconds, 50):.2f} | "
              f"{dict(client.outcomes)} |")  # fmt: skip
    report = {
        "model": model, "device": "cpu", "heavy_clients": args.heavy, "worker_threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "cpus": os.cpu_count(), "load_average_before": list(load_before), "load_average_after": list(load_after),
        "light": rows, "p50_ratio": round(ratio, 2), "target_ratio": 2.0,
        "heavy": [{"client": c.name, "requests": len(c.seconds), "median_s": round(percentile(c.seconds, 50), 2),
                   "outcomes": dict(c.outcomes)} for c in heavy],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
