"""A worker's Prometheus metrics, served by prometheus_client's own HTTP server in a thread
(`llava-serve worker --metrics-port N`). Names match the controller's and vLLM's where they fit.

Latencies count from the job's `enqueued_at` (the controller's clock), so they include queueing; keep hosts'
clocks in sync (NTP) for them to mean much across machines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

log = logging.getLogger(__name__)

MODEL = "model_name"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


def _batch_buckets(max_batch: int) -> tuple[float, ...]:
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(float(size))
        size *= 2
    return (*sizes, float(max_batch))


class WorkerMetrics:
    """Counters, histograms and gauges of one worker process, in a registry of its own."""

    def __init__(self, *, model: str, max_batch: int, registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._last_token: dict[str, float] = {}
        self.info = Gauge("llava_worker_info", "Constant 1, labelled with the worker", ["worker_id", MODEL, "device"],
                          registry=r)  # fmt: skip
        self.success = Counter(
            "llava_request_success", "Jobs that finished, by finish reason", [MODEL, "finished_reason"], registry=r
        )
        self.failure = Counter("llava_request_failure", "Jobs that failed, by error code", [MODEL, "code"], registry=r)
        self.prompt_tokens = Counter("llava_prompt_tokens", "Prompt tokens of finished jobs", [MODEL], registry=r)
        self.generation_tokens = Counter("llava_generation_tokens", "Generated tokens", [MODEL], registry=r)
        self.ttft = Histogram("llava_time_to_first_token_seconds", "From enqueue to the job's first token", [MODEL],
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("llava_inter_token_latency_seconds", "Between two text updates of a job", [MODEL],
                             buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("llava_e2e_request_latency_seconds", "From enqueue to the job's end", [MODEL],
                             buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.queue_time = Histogram("llava_request_queue_time_seconds", "From enqueue to admission", [MODEL],
                                    buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.running = Gauge("llava_num_requests_running", "Jobs in this worker's batch", [MODEL], registry=r)
        self.slots = Gauge("llava_batch_slots", "This worker's max_batch", [MODEL], registry=r)
        self.slots.labels(model).set(max_batch)
        self.occupancy = Gauge(
            "llava_batch_occupancy_ratio", "Jobs in the batch over max_batch, at the last step", [MODEL], registry=r
        )
        self.batch_size = Histogram("llava_batch_size", "Jobs in the batch at each decode step", [MODEL],
                                    buckets=_batch_buckets(max_batch), registry=r)  # fmt: skip

    def set_info(self, worker_id: str, device: str) -> None:
        self.info.labels(worker_id, self.model, device).set(1)

    def on_step(self, updates: list[Any], now: float) -> None:
        """After one engine step (one update per job in the batch): its batch size, and the gap since each job's
        previous text."""
        if updates:
            self.batch_size.labels(self.model).observe(len({u.job_id for u in updates}))
        for update in updates:
            if not getattr(update, "text", ""):
                continue
            previous = self._last_token.get(update.job_id)
            if previous is not None:
                self.itl.labels(self.model).observe(max(0.0, now - previous))
            self._last_token[update.job_id] = now

    def set_running(self, active: int) -> None:
        self.running.labels(self.model).set(active)
        self.occupancy.labels(self.model).set(active / self.max_batch if self.max_batch else 0.0)

    def on_finished(self, job: Any) -> None:
        """A job's recorded end (`workers.jobstate.ActiveJob`): outcome, tokens and latencies."""
        self._last_token.pop(job.job_id, None)
        enqueued = job.request.enqueued_at
        if job.error is not None:
            self.failure.labels(self.model, job.error.code).inc()
        elif job.finish_reason is not None:
            self.success.labels(self.model, job.finish_reason.value).inc()
        self.prompt_tokens.labels(self.model).inc(job.usage.prompt_tokens)
        self.generation_tokens.labels(self.model).inc(job.usage.completion_tokens)
        if job.started_at is not None:
            self.queue_time.labels(self.model).observe(max(0.0, job.started_at - enqueued))
        if job.first_token_at is not None:
            self.ttft.labels(self.model).observe(max(0.0, job.first_token_at - enqueued))
        if job.finished_at is not None and job.error is None:
            self.e2e.labels(self.model).observe(max(0.0, job.finished_at - enqueued))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[int, Callable[[], None]]:
        """Serve `/metrics` on `host:port` (0 picks a free port) from a daemon thread; returns the port and a stop
        function."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return bound, stop
