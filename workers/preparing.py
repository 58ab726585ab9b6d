"""Preparing claimed jobs off the worker's step loop: loading images, templating, tokenizing and preprocessing run
on a few daemon threads, so that no job's preparation holds the decode steps of the jobs already running.

The loop submits jobs in claim order and takes back the finished ones, still in claim order; a job whose
preparation is not finished does not hold back the ready jobs claimed after it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R")  # what is prepared from (a job request)
P = TypeVar("P")  # what preparing gives (a prepared job)

DEFAULT_PREPARE_THREADS = 2
# Niceness of the preparation threads (Linux schedules threads as tasks): on a busy CPU the step loop goes first, so
# decoding a client's large images slows that client's job more than everyone's decode steps.
PREPARE_NICE = 10


@dataclass
class Preparation(Generic[R, P]):
    """One job's preparation: its request, then either `prepared` or the `error` preparing raised."""

    job_id: str
    request: R
    seq: int  # claim order
    prepared: P | None = None
    error: BaseException | None = None
    done: bool = False
    dropped: bool = False


class Preparer(Generic[R, P]):
    """Runs `prepare(request)` for submitted jobs on `threads` daemon threads. Methods other than the threads' own
    are called from one loop. Daemon threads: a preparation stuck in a library never keeps the process alive."""

    def __init__(self, prepare: Callable[[R], P], threads: int = DEFAULT_PREPARE_THREADS) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self._prepare = prepare
        self._threads = threads
        self._started: list[threading.Thread] = []
        self._inbox: queue.Queue[Preparation[R, P] | None] = queue.Queue()
        self._in_flight: list[Preparation[R, P]] = []  # claim order
        self._finished = threading.Condition()
        self._submitted = 0

    def __len__(self) -> int:
        """Jobs submitted and not yet taken back (preparing, or ready)."""
        return len(self._in_flight)

    def __bool__(self) -> bool:
        return bool(self._in_flight)

    def in_flight(self) -> list[Preparation[R, P]]:
        """The preparations not yet taken back, in claim order."""
        return list(self._in_flight)

    def submit(self, job_id: str, request: R) -> None:
        """Start preparing `request`; it comes back from `take_ready` once done."""
        if len(self._started) < self._threads:
            thread = threading.Thread(target=self._run, name=f"llava-prepare-{len(self._started)}", daemon=True)
            thread.start()
            self._started.append(thread)
        self._submitted += 1
        preparation: Preparation[R, P] = Preparation(job_id, request, self._submitted)
        self._in_flight.append(preparation)
        self._inbox.put(preparation)

    def take_ready(self) -> list[Preparation[R, P]]:
        """The finished preparations, in claim order, removed from the in-flight ones."""
        ready = [p for p in self._in_flight if p.done]
        if ready:
            self._in_flight = [p for p in self._in_flight if not p.done]
        return ready

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a preparation to be finished; True when one is."""
        with self._finished:
            return self._finished.wait_for(lambda: any(p.done for p in self._in_flight), timeout_s)

    def drop(self, job_ids: list[str] | None = None) -> list[str]:
        """Forget the preparations of `job_ids` (all when None), finished or not; their results are discarded. The
        ids dropped, in claim order."""
        dropped = [p for p in self._in_flight if job_ids is None or p.job_id in job_ids]
        for preparation in dropped:
            preparation.dropped = True  # a thread that has not started it skips it
        self._in_flight = [p for p in self._in_flight if p not in dropped]
        return [p.job_id for p in dropped]

    def close(self) -> None:
        """Stop the threads once they finish what they are doing; in-flight preparations are dropped."""
        self.drop()
        for _ in self._started:
            self._inbox.put(None)

    def _run(self) -> None:
        lower_priority(PREPARE_NICE)
        while True:
            preparation = self._inbox.get()
            if preparation is None:
                return
            if preparation.dropped:
                continue
            try:
                preparation.prepared = self._prepare(preparation.request)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which fails the job alone
                preparation.error = exc
            with self._finished:
                preparation.done = True
                self._finished.notify_all()


def lower_priority(nice: int) -> None:
    """Raise the calling thread's niceness by `nice` where the system allows it (Linux); elsewhere nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
    except (AttributeError, OSError):  # no per-thread priorities here
        pass
