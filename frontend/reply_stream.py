"""A reply's events read on a thread of their own, so the page can redraw and stop while the network is silent."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from contract.client import ControllerClient
from contract.messages import GenerateRequest, StreamEvent

# What `ReplyStream.next` returns besides events and client errors.
ENDED = "ended"  # the stream ended (with or without a final event)
STOPPED = "stopped"  # `stop()` was called
SILENT = "silent"  # nothing arrived within the timeout


class ReplyStream:
    """The events of one `POST /api/v1/generate`, read by a daemon thread. `stop()` ends `next` at once whatever
    the network does; the thread then closes the stream at its next event (the controller cancels on close)."""

    def __init__(self, client: ControllerClient, request: GenerateRequest, *, end_user: str | None = None) -> None:
        self._inbox: queue.Queue[StreamEvent | Exception | str] = queue.Queue()
        self._stopped = threading.Event()
        events = client.generate(request, end_user=end_user)
        self._thread = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._thread.start()

    def _read(self, events: Iterator[StreamEvent]) -> None:
        try:
            for event in events:
                if self._stopped.is_set():
                    break
                self._inbox.put(event)
        except Exception as exc:  # handed to the page, which shows it in the reply
            self._inbox.put(exc)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            self._inbox.put(ENDED)

    def next(self, timeout_s: float | None) -> StreamEvent | Exception | str:
        """The next event, a client error (a `LlavaError` or a bug), ENDED, STOPPED, or SILENT after `timeout_s`."""
        if self._stopped.is_set():
            return STOPPED
        try:
            return self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return SILENT

    def stop(self) -> None:
        """Make `next` return STOPPED now; the reading thread stops at its next event."""
        self._stopped.set()
        self._inbox.put(STOPPED)
