"""The worker cancels the jobs of a controller whose lease is gone, but never for a lease that lapsed only because
Redis was away: a missing lease is judged once the worker has reached Redis for longer than the lease TTL."""

from __future__ import annotations

import threading
import time

from contract import jobs, keys, liveness
from contract.messages import JobRequest, SamplingParams
from infra.embedded_redis import EmbeddedRedis
from infra.redis import connect
from tests.workers.harness import MODEL, RunningWorker, make_worker, status, wait_for
from tests.workers.test_worker_fencing import Listener


class LeaseHolder:
    """A stand-in controller that refreshes its lease (TTL `ttl_s`) while `holding` is set, outages ignored."""

    def __init__(self, client, controller_id: str, ttl_s: int = 1) -> None:
        self.client = client
        self.key = keys.controller(controller_id)
        self.ttl_s = ttl_s
        self.holding = threading.Event()
        self.holding.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            if self.holding.is_set():
                try:
                    self.client.set(self.key, "1", ex=self.ttl_s)
                except Exception:  # noqa: BLE001 - Redis away: try again
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _enqueue(client, job_id: str, controller_id: str, prompt: str) -> None:
    params = SamplingParams(max_new_tokens=2000)
    request = JobRequest(job_id=job_id, model=MODEL, prompt=prompt, params=params, controller_id=controller_id)
    jobs.enqueue(client, request, max_queue=10, result_ttl=600)


def test_a_lease_lapsed_during_a_redis_outage_cancels_nothing(tmp_path):
    server = EmbeddedRedis(tmp_path, persist=True).start()
    client = connect(server.url)
    holder = LeaseHolder(connect(server.url), "live")
    try:
        # Redis up longer than the lease TTL: the worker judges leases from its start (checked below with "orphan").
        wait_for(lambda: liveness.redis_uptime_s(client) > keys.CONTROLLER_LEASE_TTL_S, timeout=30, what="uptime")
        with RunningWorker(make_worker(client, reply_tokens=2000, step_delay_s=0.005)):
            _enqueue(client, "kept", "live", "keep going")
            wait_for(lambda: client.hget(keys.worker_jobs("w1"), "kept") == b"streaming", what="streaming")
            _enqueue(client, "orphan", "dead", "nobody reads this")
            client.delete(keys.controller("dead"))
            wait_for(lambda: status(client, "orphan") == "canceled", what="the orphan cancelled")

            holder.holding.clear()
            server.stop()
            time.sleep(2.0)  # an outage longer than the lease's 1 s TTL (not a timing assertion)
            server.start()
            listener = Listener(client, "kept")
            try:
                # The lease is missing (expired during the outage, or just after a reload from the append-only
                # file) while the worker streams on: a controller slow to reconnect.
                wait_for(lambda: not client.exists(keys.controller("live")), what="the lease lapsed")
                seen = len(listener.of("kept"))
                wait_for(lambda: len(listener.of("kept")) >= seen + 20, what="streaming without the lease")
                holder.holding.set()
                view = wait_for(lambda: (v := jobs.view(client, "kept")) and v.outcome and v, timeout=60, what="kept")
            finally:
                listener.close()
            assert view.status == "finished" and view.outcome.usage.completion_tokens == 2000
    finally:
        holder.stop()
        client.close()
        server.stop()
