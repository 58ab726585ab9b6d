"""Every message published on any job's chunk channel, as Redis itself delivers it: what the workers really sent,
whatever a controller forwarded. For fault runs that must show nobody published into a stream it no longer owned."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from contract import keys
from contract.messages import ErrorEvent, StreamEvent, parse_event
from infra.redis import connect

CONFIRM_TIMEOUT_S = 30.0
MARKER_JOB = "end-of-observation"


class ChannelLog(threading.Thread):
    """Subscribed (confirmed) once constructed; `start()` records messages with their arrival time (perf_counter)."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(name="channel-log", daemon=True)
        self.client = connect(redis_url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe(keys.chunks_pattern())
        self.messages: dict[str, list[tuple[float, StreamEvent]]] = defaultdict(list)
        self._stop_event = threading.Event()
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while (confirmed := self.pubsub.get_message(timeout=1)) is None or confirmed["type"] != "psubscribe":
            if time.monotonic() > deadline:  # subscribed before any request is sent, or no observation
                raise RuntimeError(f"no PSUBSCRIBE confirmation from Redis within {CONFIRM_TIMEOUT_S:g} s "
                                   f"(last {confirmed!r})")  # fmt: skip

    def run(self) -> None:
        while not self._stop_event.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "pmessage":
                channel = message["channel"].decode()
                self.messages[channel].append((time.perf_counter(), parse_event(message["data"])))

    def of(self, job_id: str) -> list[tuple[float, StreamEvent]]:
        return self.messages.get(keys.chunks(job_id), [])

    def publish_marker(self) -> None:
        """Publish a marker; pub/sub keeps order, so once `caught_up()` every message published before is here."""
        event = ErrorEvent(job_id=MARKER_JOB, code="marker", message="")
        self.client.publish(keys.chunks(MARKER_JOB), event.model_dump_json())

    def caught_up(self) -> bool:
        return bool(self.of(MARKER_JOB))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.pubsub.close()
        self.client.close()
