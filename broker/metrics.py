"""The controller's Prometheus metrics (`GET /metrics`) and the per-minute counters behind `llava-serve status`.

Two kinds, as Prometheus expects of a service that runs as several processes:
- per-process counters and histograms of the streams this process relayed (what its clients saw: time to first
  token includes queueing); sum them across replicas;
- gauges read from Redis at scrape time (queue depth, live workers, running jobs, slots), the same from every
  replica; aggregate them with max(), not sum().
Names follow vLLM's (`vllm:` → `llava_`) where they fit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.stats import queue_job_counts
from contract.messages import DoneEvent, ErrorEvent, TokenEvent

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
MODEL = "model_name"


class StreamObserver:
    """Follows one job's events as a controller relays them; `close()` accounts for a stream cut short."""

    def __init__(self, metrics: ControllerMetrics, model: str, on_final: Callable[[str, bool, int, int], None]):
        self.m = metrics
        self.model = model
        self.on_final = on_final
        self.started = time.monotonic()
        self.last_token: float | None = None
        self.final = False
        metrics.streams_active.inc()

    def on_event(self, event: Any) -> None:
        now = time.monotonic()
        if isinstance(event, TokenEvent):
            if self.last_token is None:
                self.m.ttft.labels(self.model).observe(now - self.started)
            else:
                self.m.itl.labels(self.model).observe(now - self.last_token)
            self.last_token = now
        elif isinstance(event, DoneEvent):
            self.final = True
            self.m.success.labels(self.model, event.finish_reason.value).inc()
            self.m.prompt_tokens.labels(self.model).inc(event.usage.prompt_tokens)
            self.m.generation_tokens.labels(self.model).inc(event.usage.completion_tokens)
            self.m.e2e.labels(self.model).observe(now - self.started)
            t = event.timings
            if t.enqueued_at is not None and t.started_at is not None:
                self.m.queue_time.labels(self.model).observe(max(0.0, t.started_at - t.enqueued_at))
            self.on_final(self.model, True, event.usage.prompt_tokens, event.usage.completion_tokens)
        elif isinstance(event, ErrorEvent):
            self.final = True
            self.m.failure.labels(self.model, event.code).inc()
            self.on_final(self.model, False, 0, 0)

    def close(self) -> None:
        self.m.streams_active.dec()
        if not self.final:  # the client went away first; the job was cancelled
            self.final = True
            self.m.success.labels(self.model, "cancelled").inc()
            self.on_final(self.model, True, 0, 0)


class ControllerMetrics:
    """This process's metrics in a registry of its own (tests build several apps in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.success = Counter(
            "llava_request_success", "Requests that finished, by finish reason", [MODEL, "finished_reason"], registry=r
        )
        self.failure = Counter(
            "llava_request_failure", "Requests that ended with an error event, by code", [MODEL, "code"], registry=r
        )
        self.rejected = Counter(
            "llava_request_rejected", "Generation requests refused before a job was queued, by error code", ["code"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("llava_prompt_tokens", "Prompt tokens of finished requests", [MODEL], registry=r)
        self.generation_tokens = Counter(
            "llava_generation_tokens", "Generated tokens of finished requests", [MODEL], registry=r
        )
        self.ttft = Histogram(
            "llava_time_to_first_token_seconds", "From enqueue to the first token relayed (queueing included)",
            [MODEL], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "llava_inter_token_latency_seconds", "Time between two token events of a stream", [MODEL],
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "llava_e2e_request_latency_seconds", "From enqueue to the final event", [MODEL], buckets=E2E_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "llava_request_queue_time_seconds", "Time a job waited in its queue (worker's timings)", [MODEL],
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.streams_active = Gauge("llava_streams_active", "Streams this controller process is relaying", registry=r)

    def observe(self, model: str, on_final: Callable[[str, bool, int, int], None] | None = None) -> StreamObserver:
        return StreamObserver(self, model, on_final or (lambda *_: None))

    def watch_redis(self, get_redis: Callable[[], Any]) -> None:
        """Add the scrape-time gauges read from Redis through `get_redis()` (a sync client)."""
        self.registry.register(RedisStateCollector(get_redis))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RedisStateCollector(Collector):
    """Gauges read from Redis at scrape time; only `llava_redis_up 0` when Redis does not answer."""

    def __init__(self, get_redis: Callable[[], Any]) -> None:
        self.get_redis = get_redis

    def describe(self) -> list:
        return []  # read from Redis at scrape time, not at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from broker.status import snapshot

        up = GaugeMetricFamily("llava_redis_up", "1 when the controller reached Redis for this scrape")
        try:
            report = snapshot(self.get_redis(), rate_minutes=None)
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even with Redis down
            log.info("metrics: Redis state unavailable (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        families = {
            "waiting": GaugeMetricFamily("llava_num_requests_waiting", "Jobs in the model's queue", labels=[MODEL]),
            "oldest": GaugeMetricFamily(
                "llava_queue_oldest_wait_seconds", "Age of the next job to be claimed", labels=[MODEL]
            ),
            "running": GaugeMetricFamily("llava_num_requests_running", "Jobs in live workers' batches", labels=[MODEL]),
            "workers": GaugeMetricFamily("llava_num_workers", "Live workers serving the model", labels=[MODEL]),
            "slots": GaugeMetricFamily(
                "llava_batch_slots", "Batch slots of live workers (max_batch summed)", labels=[MODEL]
            ),
            "occupancy": GaugeMetricFamily(
                "llava_batch_occupancy_ratio", "Running jobs over batch slots of live workers", labels=[MODEL]
            ),
        }
        for q in report.queues:
            families["waiting"].add_metric([q.model], q.depth)
            families["oldest"].add_metric([q.model], q.oldest_wait_s or 0.0)
            families["running"].add_metric([q.model], q.running)
            families["workers"].add_metric([q.model], q.workers)
            families["slots"].add_metric([q.model], q.slots)
            families["occupancy"].add_metric([q.model], q.running / q.slots if q.slots else 0.0)
        yield from families.values()
        log_entries = GaugeMetricFamily("llava_conversation_log_entries", "Entries in the conversation log")
        log_entries.add_metric([], report.conversation_log_entries)
        yield log_entries
        refused = CounterMetricFamily(
            "llava_requests_refused",
            "Requests refused by limits or moderation (reply_flagged: a reply stopped), every replica, by code",
            labels=["code"],
        )
        for code in ("rate_limited", "content_refused", "reply_flagged"):
            refused.add_metric([code], report.refusals.get(code, 0))
        yield refused


class StatsWriter:
    """Adds each finished job to the per-minute counters in Redis, in the background (a stream's final event is
    never held back by it); one pipelined write per job."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._tasks: set[asyncio.Task] = set()

    def record(self, model: str, ok: bool, prompt_tokens: int, completion_tokens: int) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._write(model, ok, prompt_tokens, completion_tokens))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, model: str, ok: bool, prompt_tokens: int, completion_tokens: int) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                queue_job_counts(pipe, model, ok=ok, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - counters are best effort; Redis may be down
            log.debug("stats write failed: %s", exc)

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Wait (briefly) for pending writes, at shutdown."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)


router = APIRouter()


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics of this controller process, and broker gauges from Redis",
)
async def metrics(request: Request) -> Response:
    registry_metrics: ControllerMetrics = request.app.state.metrics
    body = await anyio.to_thread.run_sync(registry_metrics.exposition)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
