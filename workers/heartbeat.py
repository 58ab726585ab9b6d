"""A worker's liveness: a thread with its own Redis connection that refreshes `keys.worker()` and never waits on
the model, so a worker busy in a long prefill still looks alive and a dead one expires in WORKER_TTL_S seconds."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis as redis_lib
from redis import Redis

from contract import keys, liveness
from contract.messages import WorkerInfo
from infra.redis import private_copy

log = logging.getLogger(__name__)


def private_client(client: Redis) -> Redis:
    """A client with its own connection pool, configured like `client` (a stuck or busy pool is not shared)."""
    return private_copy(client)  # a Sentinel client's pool needs its service and sentinels too


class Heartbeat(threading.Thread):
    """Refreshes a worker's key every HEARTBEAT_INTERVAL_S; survives Redis outages (logs, tries again).

    `lost` is set when a beat finds the worker key gone after an earlier beat had written it: the worker was
    unreachable for longer than WORKER_TTL_S and a sweeper may have taken its jobs away.
    """

    def __init__(
        self,
        client: Redis,
        info: Callable[[], WorkerInfo],
        *,
        interval_s: float = keys.HEARTBEAT_INTERVAL_S,
    ) -> None:
        super().__init__(name="llava-heartbeat", daemon=True)
        self.client = private_client(client)
        self.info = info
        self.interval_s = interval_s
        self.lost = threading.Event()
        self.beats = 0
        self._stop_event = threading.Event()
        self._down = False

    def beat(self) -> bool:
        """One heartbeat; False (logged) when Redis could not be reached."""
        try:
            expired = liveness.heartbeat(self.client, self.info())
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
            if not self._down:
                log.warning("heartbeat: Redis unreachable (%s); retrying every %.1f s", exc, self.interval_s)
            self._down = True
            return False
        if self._down:
            log.info("heartbeat: Redis reachable again; worker registered")
            self._down = False
        if expired and self.beats:
            log.warning("heartbeat: the worker key had expired; a sweeper may have taken this worker's jobs")
            self.lost.set()
        self.beats += 1
        return True

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # never let the liveness thread die silently
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
        self.client.close()
