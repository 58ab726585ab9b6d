"""One pub/sub connection per controller process, fanning job events out to per-request asyncio queues.

The relay SUBSCRIBEs to the chunk channel of each job this process streams (`keys.chunks(job_id)`), and
UNSUBSCRIBEs when the stream ends, all on one shared connection: a controller holds a thousand streams with one
Redis connection and receives the events of its own jobs only, so replicas add relay capacity. Subscriptions and
unsubscriptions requested in the same moment go out as one SUBSCRIBE (or UNSUBSCRIBE) command.

`register()` starts routing a job's events at once; `Subscription.wait_subscribed()` returns once Redis has
confirmed the job's channel, after which no event published on it is missed while the connection lasts. The
connection also holds one channel of its own (the anchor), confirmed on every (re)connect.

After a Redis outage the relay reconnects with backoff and resubscribes every live stream in one command (each
reconnect builds a new client, so with a `redis+sentinel://` URL it asks the sentinels for the current master and
follows a failover; tests/infra/test_sentinel.py); events published meanwhile are lost (pub/sub keeps nothing),
and each subscription learns so (`missed_messages()`), which streams cover from the job record (`broker.streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from contract import keys

log = logging.getLogger(__name__)

# A stream that falls this far behind is a stalled client; its events are dropped and `overflowed` is set,
# so the stream finishes from the job record instead of holding memory without bound.
MAX_PENDING_EVENTS = 100_000
CLOSE_TIMEOUT_S = 2.0
# Channels per SUBSCRIBE / UNSUBSCRIBE command: a thousand streams starting at once go out in one command.
MAX_CHANNELS_PER_COMMAND = 1000


class Subscription:
    """The events of one job, in publish order; `close()` (or leaving the `with`) stops the routing."""

    def __init__(self, relay: ChunkRelay, job_id: str) -> None:
        self.job_id = job_id
        self.channel = keys.chunks(job_id)
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.overflowed = False
        # The relay's reconnect count when this subscription last looked: a change means messages may be lost.
        self.seen_generation = relay.generation
        self._relay = relay
        self._subscribed = asyncio.Event()

    def deliver(self, data: bytes) -> None:
        if self.queue.qsize() >= MAX_PENDING_EVENTS:
            self.overflowed = True
            return
        self.queue.put_nowait(data)

    async def wait_subscribed(self, timeout_s: float) -> bool:
        """Whether Redis confirmed this job's channel (waiting up to `timeout_s`): only then is no event missed."""
        if self._subscribed.is_set():
            return True
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def get(self, timeout_s: float) -> bytes | None:
        """The next raw event, or None after `timeout_s` seconds of silence."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
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
    """Subscribes to `keys.chunks(job_id)` for each registered job and routes its messages to that subscription."""

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        poll_timeout_s: float = 1.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._connect = connect
        self._subscriptions: dict[str, Subscription] = {}  # channel -> subscription
        self._poll_timeout_s = poll_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._anchor = f"{keys.PREFIX}relay:{uuid.uuid4().hex}"
        # On the current connection: channels a SUBSCRIBE went out for (and no UNSUBSCRIBE since), and how many
        # SUBSCRIBE confirmations of each are still to come (confirmed once it reaches zero).
        self._on_server: set[str] = set()
        self._replies_due: dict[str, int] = {}
        self._changed = asyncio.Event()  # wakes the task that sends (UN)SUBSCRIBE commands
        self.generation = 0  # bumped each time the connection is (re)established after the first
        self.messages_received = 0  # every message Redis sent this relay, routed or not
        self.messages_relayed = 0
        self.subscribe_commands = 0
        self.unsubscribe_commands = 0

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

    async def wait_connected(self, timeout_s: float) -> bool:
        """Whether the relay's connection is up (waiting up to `timeout_s` s)."""
        if self._connected.is_set():
            return True
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def register(self, job_id: str) -> Subscription:
        """Start routing a job's events and ask Redis for its channel; await `wait_subscribed()` on the result
        before the job is enqueued so that none of its events is missed."""
        channel = keys.chunks(job_id)
        if channel in self._subscriptions:
            raise ValueError(f"job {job_id!r} already has a subscription")
        sub = Subscription(self, job_id)
        self._subscriptions[channel] = sub
        if channel in self._on_server and not self._replies_due.get(channel):
            sub._subscribed.set()  # still subscribed: an earlier stream's UNSUBSCRIBE has not gone out yet
        self._changed.set()
        return sub

    def unregister(self, job_id: str, sub: Subscription | None = None) -> None:
        channel = keys.chunks(job_id)
        current = self._subscriptions.get(channel)
        if current is not None and (sub is None or current is sub):
            del self._subscriptions[channel]
            self._changed.set()

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        sub = self._subscriptions.get(name)
        if sub is not None:
            sub.deliver(data if isinstance(data, bytes) else data.encode())
            self.messages_relayed += 1

    def _confirmed(self, channel: str) -> None:
        due = self._replies_due.get(channel, 0) - 1
        if due > 0:
            self._replies_due[channel] = due
            return
        self._replies_due.pop(channel, None)
        sub = self._subscriptions.get(channel)
        if sub is not None and channel in self._on_server:
            sub._subscribed.set()

    def _reset_connection_state(self) -> None:
        self._on_server = set()
        self._replies_due = {}
        for sub in self._subscriptions.values():
            sub._subscribed.clear()

    async def _send_changes(self, pubsub: Any) -> None:
        """Bring the server's subscriptions to the registered set: batched UNSUBSCRIBE, then batched SUBSCRIBE."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            wanted = self._subscriptions.keys()
            stale = [c for c in self._on_server if c not in self._subscriptions]
            new = [c for c in wanted if c not in self._on_server]
            for i in range(0, len(stale), MAX_CHANNELS_PER_COMMAND):
                batch = stale[i : i + MAX_CHANNELS_PER_COMMAND]
                self._on_server.difference_update(batch)
                await pubsub.execute_command("UNSUBSCRIBE", *batch)
                self.unsubscribe_commands += 1
            for i in range(0, len(new), MAX_CHANNELS_PER_COMMAND):
                batch = new[i : i + MAX_CHANNELS_PER_COMMAND]
                self._on_server.update(batch)
                for channel in batch:
                    self._replies_due[channel] = self._replies_due.get(channel, 0) + 1
                await pubsub.execute_command("SUBSCRIBE", *batch)
                self.subscribe_commands += 1

    async def _await_anchor(self, pubsub: Any) -> None:
        """Read until Redis confirms the anchor channel (routing any job message that comes first)."""
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=self._poll_timeout_s)
            if message is not None and self._handle(message):
                return

    def _handle(self, message: dict[str, Any]) -> bool:
        """Route one pub/sub reply; True when it is the anchor's subscribe confirmation."""
        kind = message.get("type")
        if kind == "message":
            self.messages_received += 1
            self._dispatch(message["channel"], message["data"])
        elif kind == "subscribe":
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if channel == self._anchor:
                return True
            self._confirmed(channel)
        return False

    def _resubscribe_all(self) -> None:
        """A new connection: every registered job's channel must be subscribed again, and events may be lost."""
        self.generation += 1
        log.info("chunk relay re-subscribed after a Redis outage")
        self._reset_connection_state()
        self._changed.set()

    async def _run(self) -> None:
        backoff = self._backoff_initial_s
        first = True
        while True:
            client = None
            pubsub = None
            sender: asyncio.Task[None] | None = None
            try:
                client = self._connect()
                pubsub = client.pubsub()
                self._reset_connection_state()
                await pubsub.subscribe(self._anchor)  # the only channel redis-py itself knows of
                await self._await_anchor(pubsub)
                if not first:
                    self._resubscribe_all()
                first = False
                self._changed.set()
                self._connected.set()
                backoff = self._backoff_initial_s
                sender = asyncio.get_running_loop().create_task(self._send_changes(pubsub))
                while True:
                    if sender.done():
                        sender.result()  # a failed send: reconnect
                        raise ConnectionError("the relay's subscription task ended")
                    message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=self._poll_timeout_s)
                    # redis-py may reconnect inside a read and resubscribe the anchor alone: a second
                    # confirmation of it means every job channel must be subscribed again.
                    if message is not None and self._handle(message):
                        self._resubscribe_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any Redis failure: reconnect with backoff
                if self._connected.is_set():
                    log.warning("chunk relay lost Redis (%s); reconnecting", exc)
                self._connected.clear()
                first = False
                await asyncio.sleep(backoff)
                backoff = min(self._backoff_max_s, backoff * 2)
            finally:
                self._connected.clear()
                if sender is not None:
                    sender.cancel()
                    with contextlib.suppress(BaseException):
                        await sender
                for closer in (pubsub, client):
                    if closer is not None:
                        # bounded: a connection cut mid-read must not hold up shutdown or the reconnect
                        with contextlib.suppress(Exception, asyncio.CancelledError):
                            await asyncio.wait_for(asyncio.shield(closer.aclose()), CLOSE_TIMEOUT_S)
