"""A scripted stand-in for a model worker, for controller tests: it keeps the real Redis contract (liveness key,
claim through `contract.jobs`, events published on `keys.chunks(job_id)`, outcome recorded with `jobs.finish`) and
generates nothing; the test says which tokens it publishes. Also the request builders the controller tests share."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import redis
from PIL import Image

from broker.context import StreamTimings
from contract import claims, jobs, keys
from contract.client import iter_sse
from contract.messages import DoneEvent, ErrorEvent, FinishReason, JobOutcome, JobRequest, TokenEvent, Usage, WorkerInfo
from infra.settings import ControllerSettings


class ScriptedWorker:
    def __init__(self, client: redis.Redis, model: str = "tiny-llava", worker_id: str = "scripted-1") -> None:
        self.redis = client
        self.model = model
        self.worker_id = worker_id

    def register(
        self, *, context_length: int | None = 2048, draining: bool = False, image_modes: list[str] | None = None
    ) -> ScriptedWorker:
        now = time.time()
        info = WorkerInfo(
            worker_id=self.worker_id,
            models=[self.model],
            max_batch=4,
            device="cpu",
            host="test",
            pid=0,
            software_version="scripted",
            started_at=now,
            heartbeat_at=now,
            context_length=context_length,
            draining=draining,
            image_modes=image_modes,
        )
        with self.redis.pipeline() as pipe:
            pipe.set(keys.worker(self.worker_id), info.model_dump_json(), ex=60)  # no heartbeat: live for the test
            pipe.sadd(keys.workers(), self.worker_id)
            pipe.execute()
        return self

    def unregister(self) -> None:
        self.redis.delete(keys.worker(self.worker_id))
        self.redis.srem(keys.workers(), self.worker_id)

    def claim(self, timeout: float = 10.0) -> JobRequest:
        """Wait for a job in the model's queue and claim it (through `contract.jobs`, as a worker does)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            claimed = claims.claim(self.redis, self.worker_id, self.model, 1)
            if claimed:
                return claimed[0]
            time.sleep(0.02)
        raise TimeoutError(f"no job for {self.model} within {timeout} s")

    def start(self, job: JobRequest) -> None:
        jobs.mark_started(self.redis, self.worker_id, job.job_id)

    def publish(self, event: TokenEvent | DoneEvent | ErrorEvent) -> None:
        self.redis.publish(keys.chunks(event.job_id), event.model_dump_json())

    def tokens(self, job: JobRequest, pieces: list[str]) -> None:
        for seq, piece in enumerate(pieces, start=1):
            self.publish(TokenEvent(job_id=job.job_id, text=piece, seq=seq))

    def finish(self, job: JobRequest, text: str, reason: FinishReason = FinishReason.eos, *, publish: bool = True):
        usage = Usage(prompt_tokens=5, completion_tokens=len(text))
        if publish:
            self.publish(DoneEvent(job_id=job.job_id, finish_reason=reason, text=text, usage=usage))
        jobs.finish(
            self.redis,
            self.worker_id,
            JobOutcome(job_id=job.job_id, status="finished", finish_reason=reason, text=text, usage=usage),
        )

    def fail(self, job: JobRequest, code: str, message: str, status_code: int = 400) -> None:
        error = ErrorEvent(job_id=job.job_id, code=code, message=message, status_code=status_code)
        self.publish(error)
        jobs.finish(self.redis, self.worker_id, JobOutcome(job_id=job.job_id, status="failed", error=error))

    def serve_one(self, pieces: list[str], reason: FinishReason = FinishReason.eos) -> JobRequest:
        """Claim one job, stream `pieces`, finish it."""
        job = self.claim()
        self.start(job)
        self.tokens(job, pieces)
        self.finish(job, "".join(pieces), reason)
        return job

    def stream_then_hold(self, pieces: list[str]) -> JobRequest:
        """Claim one job, stream `pieces` and leave it running (for cancel and disconnect tests)."""
        job = self.claim()
        self.start(job)
        self.tokens(job, pieces)
        return job

    def stream_then_fail(self, pieces: list[str], code: str, message: str, status_code: int = 500) -> JobRequest:
        """Claim one job, stream `pieces`, then fail it with an error event (an error after the stream began)."""
        job = self.stream_then_hold(pieces)
        self.fail(job, code, message, status_code)
        return job

    def in_thread(self, script: Callable[[ScriptedWorker], object]) -> ScriptThread:
        return ScriptThread(self, script)


class ScriptThread:
    """Runs a worker script beside the request; `result()` re-raises what the script raised."""

    def __init__(self, worker: ScriptedWorker, script: Callable[[ScriptedWorker], object]) -> None:
        self._value: object = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = script(worker)
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 15.0) -> object:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("worker script still running")
        if self._error is not None:
            raise self._error
        return self._value


def read_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event name, data as raw JSON) of each server-sent event, read by the clients' SSE parser; pings skipped."""
    for event, data in iter_sse(lines):
        yield event or "message", json.loads(data)


def png_b64(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 10, 10)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def chat_body(model: str = "tiny-llava", text: str = "describe", images: list[str] = (), **params) -> dict:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b}"}} for b in images]
    content.append({"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], **params}


def png_header_only(width: int, height: int) -> str:
    """A PNG whose header claims `width` x `height`, with almost no pixel data (what a bomb looks like)."""

    def png_chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return base64.b64encode(data + png_chunk(b"IEND", b"")).decode()


# Short waits so that stall checks, no-worker timeouts and relay reconnects happen within a test.
FAST = StreamTimings(stall_check_s=0.3, no_worker_timeout_s=0.6, relay_wait_s=2.0, relay_backoff_max_s=0.5)


def settings_for(redis_url: str, **overrides) -> ControllerSettings:
    return ControllerSettings(redis_url=redis_url, queued_update_interval_s=0.1, **overrides)


WATCHDOG_S = 8.0


class Watchdog:
    """Ends a stream that would otherwise never end (an `error` event with code `test_watchdog` on its channel),
    so that a regression fails the test instead of hanging it."""

    def __init__(self, client: redis.Redis, job_id: str, after_s: float = WATCHDOG_S) -> None:
        event = ErrorEvent(job_id=job_id, code="test_watchdog", message="the stream did not end by itself")
        self._timer = threading.Timer(after_s, client.publish, (keys.chunks(job_id), event.model_dump_json()))
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()
