"""One pub/sub connection per controller process, fanning job events out to per-request asyncio queues.

The relay PSUBSCRIBEs `keys.chunks_pattern()` once and routes each message by the job id in its channel name, so
a controller holds a thousand streams with one Redis connection. After a Redis outage it reconnects with
backoff; messages published meanwhile are lost (pub/sub keeps nothing), which streams cover by reading the job
record when they hear nothing for a while (`broker.streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from contract import keys

log = logging.getLogger(__name__)

# A stream that falls this far behind is a stalled client; its events are dropped and `overflowed` is set,
# so the stream finishes from the job record instead of holding memory without bound.
MAX_PENDING_EVENTS = 100_000
CLOSE_TIMEOUT_S = 2.0


class Subscription:
    """The events of one job, in publish order; `close()` (or leaving the `with`) stops the routing."""

    def __init__(self, relay: ChunkRelay, job_id: str) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.overflowed = False
        # The relay's reconnect count when this subscription last looked: a change means messages may be lost.
        self.seen_generation = relay.generation
        self._relay = relay

    def deliver(self, data: bytes) -> None:
        if self.queue.qsize() >= MAX_PENDING_EVENTS:
            self.overflowed = True
            return
        self.queue.put_nowait(data)

    async def get(self, timeout: float) -> bytes | None:
        """The next raw event, or None after `timeout` seconds of silence."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def missed_messages(self) -> bool:
        """True once per relay reconnect (or overflow) since the last call: events may have been lost."""
        lost = self.overflowed or self.seen_generation != self._relay.generation
        self.seen_generation = self._relay.generation
        return lost

    def close(self) -> None:
        self._relay.unregister(self.job_id, self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChunkRelay:
    """Routes every `keys.chunks(job_id)` message to the subscription registered for that job id."""

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        poll_timeout: float = 1.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self._connect = connect
        self._subscriptions: dict[str, Subscription] = {}
        self._poll_timeout = poll_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.generation = 0  # bumped each time the subscription is (re)established after the first
        self.messages_relayed = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def active_streams(self) -> int:
        return len(self._subscriptions)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="llava-chunk-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._task, 2 * CLOSE_TIMEOUT_S)
            self._task = None
        self._connected.clear()

    async def wait_connected(self, timeout: float) -> bool:
        """Whether the pattern subscription is live (waiting up to `timeout` s): only then is no event lost."""
        if self._connected.is_set():
            return True
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def register(self, job_id: str) -> Subscription:
        """Start routing a job's events; call before the job is enqueued so that none is missed."""
        if job_id in self._subscriptions:
            raise ValueError(f"job {job_id!r} already has a subscription")
        sub = Subscription(self, job_id)
        self._subscriptions[job_id] = sub
        return sub

    def unregister(self, job_id: str, sub: Subscription | None = None) -> None:
        current = self._subscriptions.get(job_id)
        if current is not None and (sub is None or current is sub):
            del self._subscriptions[job_id]

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        sub = self._subscriptions.get(keys.job_id_from_chunks(name))
        if sub is not None:
            sub.deliver(data if isinstance(data, bytes) else data.encode())
            self.messages_relayed += 1

    async def _run(self) -> None:
        backoff = self._backoff_initial
        first = True
        while True:
            client = None
            pubsub = None
            try:
                client = self._connect()
                pubsub = client.pubsub()
                await pubsub.psubscribe(keys.chunks_pattern())
                # psubscribe returns before the server confirms; wait for the confirmation so that
                # `connected` means "no event published from now on is missed".
                while True:
                    reply = await pubsub.get_message(ignore_subscribe_messages=False, timeout=self._poll_timeout)
                    if reply is not None and reply.get("type") == "psubscribe":
                        break
                    if reply is not None and reply.get("type") == "pmessage":
                        self._dispatch(reply["channel"], reply["data"])
                if not first:
                    self.generation += 1
                    log.info("chunk relay re-subscribed after a Redis outage")
                first = False
                self._connected.set()
                backoff = self._backoff_initial
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll_timeout)
                    if message is not None and message.get("type") == "pmessage":
                        self._dispatch(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any Redis failure: reconnect with backoff
                if self._connected.is_set():
                    log.warning("chunk relay lost Redis (%s); reconnecting", exc)
                self._connected.clear()
                first = False
                await asyncio.sleep(backoff)
                backoff = min(self._backoff_max, backoff * 2)
            finally:
                self._connected.clear()
                for closer in (pubsub, client):
                    if closer is not None:
                        # bounded: a connection cut mid-read must not hold up shutdown or the reconnect
                        with contextlib.suppress(Exception, asyncio.CancelledError):
                            await asyncio.wait_for(asyncio.shield(closer.aclose()), CLOSE_TIMEOUT_S)
