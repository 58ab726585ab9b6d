"""A worker's life around its job loop: it registers (settling what an earlier life under its id left), serves,
reconciles what it holds after a heartbeat gap, drains on stop, settles the jobs it gives up, and deregisters.

`WorkerLifecycle` is the half of `workers.worker.Worker` that starts and ends it, and uses that class's state;
`run()` returns the process exit code. Every Redis call here waits out an outage with the worker's back-off.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis as redis_lib

from contract import jobs, keys, liveness
from contract.errors import GenerationFailed, LlavaError
from contract.messages import ClaimState, FinishReason, error_from_event

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_DEVICE_ERROR = 3
REDIS_ERRORS = (redis_lib.ConnectionError, redis_lib.TimeoutError)  # Redis away: retried, never fatal


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WorkerLifecycle:
    """Start, stop, drain and settle a `Worker` (mixed into it: the job loop and its state are there)."""

    # ---- start and stop ---------------------------------------------------------------------------------------

    def stop(self, *, now: bool = False) -> None:
        """Stop claiming and drain in-flight jobs (within `drain_timeout_s`; at once with `now`). Thread-safe."""
        if now or self._stop.is_set():
            self._drain_deadline = time.monotonic()
        self._stop.set()

    def run(self) -> int:
        """Serve until stopped (exit 0) or the engine becomes unusable (non-zero)."""
        log.info("worker %s serving model %r (max_batch %d)", self.worker_id, self.model_name, self.engine.max_batch)
        if not self._register():
            log.info("exit: stopped before Redis could be reached")
            self.heartbeat.stop()
            return EXIT_OK
        self.heartbeat.start()
        try:
            code = self._loop()
        except Exception:
            log.exception("worker %s crashed; failing its jobs", self.worker_id)
            self._abandon(GenerationFailed(f"worker {self.worker_id} crashed while generating"), requeue=False)
            code = EXIT_CRASHED
        finally:
            self.preparing.close()
            self.heartbeat.stop()
            self._deregister()
        return code

    # ---- drain, abandon, register, reconcile, deregister ------------------------------------------------------

    def _drain_step(self) -> bool:
        """While stopping: False once nothing is left to do; past the drain deadline, settle what is left."""
        if not self.draining:
            self.draining = True
            self._drain_deadline = min(
                self._drain_deadline or float("inf"), time.monotonic() + self.settings.drain_timeout_s
            )
            log.info("stopping: draining %d job(s) within %.0f s", len(self.active), self.settings.drain_timeout_s)
            self.returning += self.preparing.drop()  # never started: back to the queue for another worker
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline and self.active:
            log.warning("drain timeout: settling %d unfinished job(s)", len(self.active))
            self._abandon(None, requeue=True)
        if self.active or self.engine.has_work():
            return True
        if (self.finishing or self.returning) and time.monotonic() < (self._drain_deadline or 0) + 10:
            return True  # give Redis a little longer to take the last results
        return False

    def _abandon(self, error: LlavaError | None, *, requeue: bool) -> None:
        """Settle every job still in the engine: requeue those that streamed nothing (when `requeue`), fail the
        rest with `error` (default: a worker_lost-style error), and write every pending result."""
        self.returning += self.preparing.drop()  # never started: back to the queue
        for job_id in list(self.active):
            self.engine.cancel(job_id)
        for job_id, job in list(self.active.items()):
            if requeue and not job.streaming and not job.unsent:
                requeue_one = lambda j=job_id: jobs.requeue(self.redis, self.worker_id, j, fenced=True)  # noqa: E731
                if self._retry_redis("requeue", requeue_one):
                    del self.active[job_id]
                    log.info("job %s returned to the queue", job_id)
                    continue
            if error is None:
                lost = liveness.worker_lost_error(job_id, self.worker_id, reason="shut down")
                job.end(FinishReason.error, error_from_event(lost))
            else:
                job.end(FinishReason.error, error)
            self._end(job)
        deadline = time.monotonic() + 5
        while (self.finishing or self.returning) and time.monotonic() < deadline:
            self._publish([])
            self._finish()
            if self.finishing or self.returning:
                self._backoff.wait_if_down() or time.sleep(0.05)
        self.busy_slots = 0

    def _register(self) -> bool:
        """First heartbeat, written before any claim; settles leftovers of an earlier life under the same id."""
        while not self._stop.is_set():
            try:
                table, inbox = keys.worker_jobs(self.worker_id), keys.worker_inbox(self.worker_id)
                if not self.redis.exists(keys.worker(self.worker_id)) and self.redis.exists(table, inbox):
                    jobs.settle_worker(self.redis, self.worker_id, jobs.Settled())
                liveness.register(self.redis, self.info())
                self._backoff.reachable_for(liveness.redis_uptime_s(self.redis))
                return True
            except REDIS_ERRORS as exc:
                self._backoff.failed("register", exc)
                self._backoff.wait_if_down()
        return False

    def _reconcile(self) -> None:
        """After a heartbeat gap longer than the TTL: drop the jobs a sweeper took away (requeued or failed), before
        anything else is written for them. A running job is still this worker's only while its table entry says
        started or streaming (`claimed` is a new claim of a job that went back to the queue)."""
        try:
            raw = self.redis.hgetall(keys.worker_jobs(self.worker_id))
            held = {as_text(k): as_text(v) for k, v in raw.items()}
        except REDIS_ERRORS as exc:
            self._backoff.failed("reconcile", exc)
            return
        self.heartbeat.lost.clear()
        self.preparing.drop([p.job_id for p in self.preparing.in_flight() if p.job_id not in held])
        running_states = (ClaimState.started.value, ClaimState.streaming.value)
        for job_id in [j for j in self.active if held.get(j) not in running_states]:
            self._drop(job_id)
        for job_id in [j.job_id for j in self.finishing if j.job_id not in held]:
            self._drop(job_id)

    def _deregister(self) -> None:
        if self._retry_redis("deregister", lambda: liveness.unregister(self.redis, self.worker_id)) is False:
            log.warning("worker %s left jobs behind; the sweeper settles them", self.worker_id)
        log.info("worker %s deregistered", self.worker_id)

    def _retry_redis(self, what: str, call: Any, attempts: int = 5) -> Any:
        for attempt in range(attempts):
            try:
                result = call()
                self._backoff.ok()
                return result
            except REDIS_ERRORS as exc:
                self._backoff.failed(what, exc)
                if attempt + 1 < attempts:
                    self._backoff.wait_if_down()
        return None
