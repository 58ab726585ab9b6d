"""The worker's job loop: claim → admit → generate → publish → finish, around an engine that knows no Redis.

One Redis round trip per decode step carries every job's new text, the first-token notes and the cancel checks.
Redis outages are survived: generation goes on, unsent text and final results wait, and are sent when Redis is back.
Starting, stopping, draining and settling the worker are in `workers.worker_lifecycle`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from redis import Redis

from contract import claims, jobs, keys, ownership
from contract.errors import DeviceError, GenerationFailed, LlavaError
from contract.limits import check_prompt_chars, job_text_chars
from contract.messages import FinishReason, JobRequest, TokenEvent, WorkerInfo
from infra.settings import WorkerSettings
from workers.engine_types import Engine, JobUpdate, PreparedJob
from workers.heartbeat import Heartbeat
from workers.jobstate import ActiveJob, Backoff, failure_update, load_images
from workers.preparing import DEFAULT_PREPARE_THREADS, Preparation, Preparer
from workers.worker_lifecycle import EXIT_DEVICE_ERROR, EXIT_OK, REDIS_ERRORS, WorkerLifecycle, as_text

log = logging.getLogger(__name__)

CLAIM_BLOCK_S = 1
PREPARE_POLL_S = 0.02  # while jobs are being prepared and none runs: how long the loop waits on them or a claim
SOFTWARE_VERSION = "0.1.0"


class Worker(WorkerLifecycle):
    """Serves one model's rq queue with a batching engine. `run()` returns the process exit code."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        redis: Redis,
        *,
        model_name: str,
        device: str = "cpu",
        context_length: int | None = None,
        metrics: Any = None,
        prepare_threads: int = DEFAULT_PREPARE_THREADS,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.model_name = model_name
        self.device = device
        self.context_length = context_length
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started_at = time.time()
        self.active: dict[str, ActiveJob] = {}
        self.finishing: list[ActiveJob] = []  # ended in the engine; final event or record not yet written
        self.busy_slots = 0
        self.draining = False
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self._backoff = Backoff()
        self._claim_paused = False  # set after a put_back; cleared when a job ends and frees capacity
        self.returning: list[str] = []  # claimed job ids to put back at the front of the queue
        self._claimed_ids: list[bytes | str] = []  # claimed in a step's publish round trip, not yet admitted
        self._dropping: set[str] = set()  # taken away by a sweeper; the engine lets go of them at its next step
        self.heartbeat = Heartbeat(redis, self.info)
        self.metrics = metrics  # workers.metrics.WorkerMetrics, when --metrics-port is set
        # Claimed jobs being prepared off the step loop (images loaded, templated, tokenized); see `_admit`.
        self.preparing: Preparer[JobRequest, PreparedJob] = Preparer(self._prepare, prepare_threads)

    # ---- loop -------------------------------------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            models=[self.model_name],
            max_batch=self.engine.max_batch,
            busy_slots=self.busy_slots,
            device=self.device,
            host=socket.gethostname(),
            pid=os.getpid(),
            software_version=SOFTWARE_VERSION,
            started_at=self.started_at,
            heartbeat_at=time.time(),
            context_length=self.context_length,
            draining=self.draining,
            image_modes=self.settings.image_modes,
        )

    def _loop(self) -> int:
        while True:
            if self.heartbeat.lost.is_set():
                self._reconcile()
            if not self.engine.healthy:
                log.error("exit: the engine reported an unrecoverable device error")
                self._abandon(DeviceError(f"worker {self.worker_id} lost its device"), requeue=True)
                return EXIT_DEVICE_ERROR
            if self._stop.is_set() and not self._drain_step():
                log.info("exit: stopped and drained")
                return EXIT_OK
            if not self._stop.is_set():
                self._admit(self._claim())
            if self.engine.has_work():
                updates = self._generate()
                if self.metrics is not None:
                    self.metrics.on_step(updates, time.time())
                self._publish(updates)
            elif self.finishing or self.active:
                self._publish([])
            self._finish()
            self.busy_slots = self.engine.active_count + len(self.preparing)
            if self.metrics is not None:
                self.metrics.set_running(self.busy_slots)
            if not self.engine.has_work() and (self.finishing or self.returning or self._stop.is_set()):
                self._backoff.wait_if_down() or time.sleep(0.01)

    # ---- claim ------------------------------------------------------------------------------------------------

    def _may_claim(self) -> bool:
        if self._stop.is_set() or self.returning or self._free_slots() <= 0:
            return False
        return not (self._claim_paused and self.engine.has_work())

    def _claim(self) -> list[JobRequest]:
        """Jobs claimed with the last step's publish (busy), or a blocking claim (idle)."""
        claimed_ids, self._claimed_ids = [as_text(i) for i in self._claimed_ids], []
        # A job taken away and claimed again waits until the engine has let go of its old run.
        self._claimed_ids = [i for i in claimed_ids if i in self._dropping]
        claimed_ids = [i for i in claimed_ids if i not in self._dropping]
        if not self._backoff.ready():
            if not self.engine.has_work():
                self._backoff.wait_if_down()
            self.returning += claimed_ids
            return []
        try:
            if claimed_ids or self.engine.has_work():
                return claims.claimed_requests(self.redis, self.worker_id, claimed_ids)
            if not self._may_claim():
                return []
            free = self._free_slots()
            block_s = PREPARE_POLL_S if self.preparing else CLAIM_BLOCK_S
            claimed = claims.claim_blocking(self.redis, self.worker_id, self.model_name, free, block_s)
        except REDIS_ERRORS as exc:
            self._backoff.failed("claim", exc)
            self.returning += claimed_ids
            return []
        self._backoff.ok()
        ids = [r.job_id for r in claimed.requests]
        self._forget_stale(ids)
        self._put_back_lost_claims(claimed.earlier, ids)
        return claimed.requests

    # ---- admit ------------------------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        """Engine slots taken neither by admitted jobs nor by jobs being prepared."""
        return max(self.engine.free_slots() - len(self.preparing), 0)

    def _prepare(self, request: JobRequest) -> PreparedJob:
        """On a preparation thread: the cheap size bound, then the job's images from Redis and the engine's
        `prepare` (templating, tokenizing, image preprocessing), none of it on the step loop."""
        check_prompt_chars(job_text_chars(request.messages, request.prompt), self.context_length, request.model)
        job = ActiveJob.from_request(request)
        return self.engine.prepare(job.engine_job(load_images(self.redis, request.images)))

    def _admit(self, claimed: list[JobRequest]) -> None:
        """Start preparing the claimed jobs off the loop; admit the jobs whose preparation finished, in claim order
        (one still preparing holds back no other)."""
        for request in claimed:
            self.preparing.submit(request.job_id, request)
        if self.preparing and not self.engine.has_work():
            self.preparing.wait(PREPARE_POLL_S)  # nothing to step meanwhile
        back: list[Preparation[JobRequest, PreparedJob]] = []
        for preparation in self.preparing.take_ready():
            request = preparation.request
            if back:  # keep queue order: nothing overtakes a job that did not fit
                back.append(preparation)
                continue
            try:
                if not self._admit_one(preparation):
                    back.append(preparation)
            except REDIS_ERRORS as exc:  # it goes back to the queue once Redis answers
                self._backoff.failed("admit", exc)
                back.append(preparation)
            except ownership.NotOwned:  # a sweeper took it since the claim (this worker was frozen in between)
                log.warning("job %s was taken away before it started; dropping it", request.job_id)
            except Exception as exc:  # the one catch point per job: a bad job fails alone
                log.exception("job %s failed during admission", request.job_id)
                error = exc if isinstance(exc, LlavaError) else GenerationFailed(f"admitting the job failed: {exc}")
                self._end(ActiveJob.from_request(request), error=error)
        if back:
            # the jobs claimed after the first one sent back go back too, those still being prepared included
            later = [p for p in self.preparing.in_flight() if p.seq > back[0].seq]
            self.preparing.drop([p.job_id for p in later])
            self._claim_paused = True
            self.returning += [p.job_id for p in sorted([*back, *later], key=lambda p: p.seq)]
            self._return_claimed()

    def _return_claimed(self) -> None:
        if not self.returning or not self._backoff.ready():
            return
        try:
            claims.put_back(self.redis, self.worker_id, self.model_name, self.returning)
        except REDIS_ERRORS as exc:
            self._backoff.failed("put_back", exc)
            return
        self.returning = []

    def _admit_one(self, preparation: Preparation[JobRequest, PreparedJob]) -> bool:
        """Admit one prepared job; False when it does not fit the engine now (it goes back to the queue). Raises
        what preparing it raised."""
        if preparation.error is not None:
            raise preparation.error
        request, prepared = preparation.request, preparation.prepared
        if prepared is None:
            raise GenerationFailed("preparing the job gave no result")
        job = ActiveJob.from_request(request)
        if not self.engine.fits(prepared):
            if self.engine.has_work():
                return False
            raise GenerationFailed(f"job needs {prepared.kv_tokens} KV tokens, more than this worker's token budget")
        job.started_at = time.time()
        if jobs.start_claimed(self.redis, self.worker_id, request, judge_lease=self._may_judge_leases()):
            job.end(FinishReason.cancelled)
            self._end(job)
            return True
        self.engine.add(prepared)
        self.active[request.job_id] = job
        return True

    # ---- generate ---------------------------------------------------------------------------------------------

    def _generate(self) -> list[JobUpdate]:
        try:
            return self.engine.step()
        except Exception as exc:  # the batch state is unknown after this: fail its jobs and restart the worker
            log.exception("engine step failed")
            self.engine.healthy = False
            error = DeviceError(f"the engine failed during a step: {exc}")
            return [failure_update(job_id, job.usage, error) for job_id, job in self.active.items()]

    # ---- publish ----------------------------------------------------------------------------------------------

    def _publish(self, updates: list[JobUpdate]) -> None:
        """Fold the step's updates into job state, then one pipelined round trip: new text (published only while
        each job is still this worker's), first-token notes, cancel checks of running jobs, the leases of their
        controllers, and the claim of jobs for free slots. Final events go out in `_finish`, after the job record
        is written."""
        now = time.time()
        for update in updates:
            job = self.active.get(update.job_id)
            if job is None:
                if update.finish_reason is not None:
                    self._dropping.discard(update.job_id)  # the engine let go of a job taken away
                continue
            job.take(update, now)
            if update.finish_reason is not None:
                del self.active[update.job_id]
                self.finishing.append(job)
                self._claim_paused = False
        if not self._backoff.ready():
            return
        checked = [*self.active.values(), *(j for j in self.finishing if j.unsent)]
        if not checked:
            return
        controllers = sorted({j.request.controller_id for j in self.active.values() if j.request.controller_id})
        if not self._may_judge_leases():
            controllers = []
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                ownership.queue_step(pipe, self.worker_id, [(j.job_id, self._token_event(j)) for j in checked])
                for controller_id in controllers:
                    pipe.exists(keys.controller(controller_id))
                claiming = bool(self.active) and self._may_claim()
                if claiming:
                    claims.queue_claim(pipe, self.worker_id, self.model_name, self._free_slots())
                results = pipe.execute()
        except REDIS_ERRORS as exc:
            self._backoff.failed("publish", exc)
            return
        self._backoff.ok()
        gone = {c for c, alive in zip(controllers, results[1 : 1 + len(controllers)], strict=True) if not alive}
        for job, reply in zip(checked, ownership.step_replies(results[0]), strict=True):
            if reply == ownership.TAKEN_AWAY:
                self._drop(job.job_id)
                continue
            if job.unsent:
                job.sent()
            stop = reply == 1 or job.request.controller_id in gone
            if stop and job.job_id in self.active and not job.cancel_sent:
                if reply != 1:
                    log.warning("job %s: the lease of controller %s is gone; cancelling", job.job_id,
                                job.request.controller_id)  # fmt: skip
                job.cancel_sent = True
                self.engine.cancel(job.job_id)
        if claiming:
            claimed, earlier = claims.claim_reply(results[-1])
            self._forget_stale(claimed)
            self._put_back_lost_claims(earlier, claimed)
            self._claimed_ids = [*self._claimed_ids, *claimed]

    @staticmethod
    def _token_event(job: ActiveJob) -> str:
        """The token event of the job's unsent text ('' when there is none)."""
        return TokenEvent(job_id=job.job_id, text=job.unsent, seq=job.seq + 1).model_dump_json() if job.unsent else ""

    def _may_judge_leases(self) -> bool:
        """Whether a missing controller lease means a dead controller: only once this worker has reached Redis for
        longer than the lease TTL since its last Redis error (leases lapse during an outage whatever controllers do)."""
        return self._backoff.reachable_for_s() > keys.CONTROLLER_LEASE_TTL_S and not self.heartbeat.lost.is_set()

    def _drop(self, job_id: str) -> None:
        """Forget a job a sweeper took away (requeued or failed): nothing more is written for it."""
        log.warning("job %s was taken away from this worker (requeued or failed by a sweeper); dropping it", job_id)
        if self.active.pop(job_id, None) is not None:
            self.engine.cancel(job_id)
            self._dropping.add(job_id)
        self.finishing = [j for j in self.finishing if j.job_id != job_id]
        self.returning = [i for i in self.returning if i != job_id]

    def _forget_stale(self, claimed: Any) -> None:
        """A job this worker claims from the queue while it still holds it was taken away and requeued: drop the
        old run (its id can be in the queue only after a sweeper took it)."""
        for job_id in claimed:
            if job_id in self.active or any(j.job_id == job_id for j in self.finishing) or job_id in self.returning:
                self._drop(job_id)

    def _put_back_lost_claims(self, earlier: list[str], claimed: list[str]) -> None:
        """Jobs the job table held as claimed by this worker before a claim (`earlier`), and that it holds neither
        as claimed nor as being prepared, returned or finished, come from a claim whose reply it never got: they go
        back to the queue. (A running job is marked started: one listed here was taken away and claimed again.)"""
        held = {
            *claimed, *map(as_text, self._claimed_ids), *self.returning,
            *(p.job_id for p in self.preparing.in_flight()), *(j.job_id for j in self.finishing),
        }  # fmt: skip
        lost = [job_id for job_id in earlier if job_id not in held]
        if lost:
            log.warning("the reply of a claim of job(s) %s was lost; putting them back in the queue", ", ".join(lost))
            self.returning += lost

    # ---- finish -----------------------------------------------------------------------------------------------

    def _finish(self) -> None:
        """Write the outcome of every ended job whose text went out, then its final event, so that a client
        reading the record on `done` finds it final (both retried while Redis is away)."""
        self._return_claimed()
        if not self._backoff.ready():
            return
        remaining = []
        for job in self.finishing:
            if job.unsent:
                remaining.append(job)
                continue
            try:
                if not job.recorded:
                    if not jobs.finish(self.redis, self.worker_id, job.outcome(), fenced=True):
                        log.warning("job %s was taken away from this worker; its outcome is not written", job.job_id)
                        continue
                    job.recorded = True
                    log.info("job %s %s (%d tokens)", job.job_id, job.status, job.usage.completion_tokens)
                    if self.metrics is not None:
                        self.metrics.on_finished(job)
                self.redis.publish(keys.chunks(job.job_id), job.final_event().model_dump_json())
            except REDIS_ERRORS as exc:
                self._backoff.failed("finish", exc)
                remaining.append(job)
            except Exception:  # one catch point per job: a record that cannot be written is logged, not fatal
                log.exception("could not record the outcome of job %s", job.job_id)
        self.finishing = remaining

    def _end(self, job: ActiveJob, *, error: LlavaError | None = None) -> None:
        """End a job that never entered the engine (or left it abnormally): its final event and record follow."""
        if error is not None:
            job.end(FinishReason.error, error)
        self.active.pop(job.job_id, None)
        self.finishing.append(job)
