"""The preparation pool: jobs come back in claim order among the finished ones, a slow one holds back no other,
errors come back as data, dropped jobs never come back."""

from __future__ import annotations

import threading

import pytest

from workers.preparing import Preparer


class Gates:
    """`prepare` for tests: each request names a gate; preparing it waits for the test to open that gate."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}

    def gate(self, name: str) -> threading.Event:
        return self.gates.setdefault(name, threading.Event())

    def prepare(self, request: str) -> str:
        if not self.gate(request).wait(30):
            raise AssertionError(f"gate {request} never opened")
        if request.startswith("bad"):
            raise ValueError(f"cannot prepare {request}")
        return request.upper()


def ready_ids(preparer: Preparer, count: int) -> list[str]:
    """Wait (on the preparer, with a deadline) until `count` preparations are finished, and take them."""
    taken: list = []
    for _ in range(100):
        if len(taken) >= count:
            break
        preparer.wait(0.3)
        taken += preparer.take_ready()
    assert len(taken) == count, taken
    return [p.job_id for p in taken]


def test_finished_jobs_come_back_in_claim_order_and_a_slow_one_holds_none_back() -> None:
    gates = Gates()
    preparer = Preparer(gates.prepare, threads=3)
    try:
        for name in ("slow", "a", "b"):
            preparer.submit(name, name)
        gates.gate("b").set()
        gates.gate("a").set()
        with preparer._finished:  # both finished (b most likely first): then they are taken in claim order
            assert preparer._finished.wait_for(lambda: sum(p.done for p in preparer.in_flight()) == 2, 30)
        assert ready_ids(preparer, 2) == ["a", "b"]
        assert [p.job_id for p in preparer.in_flight()] == ["slow"] and len(preparer) == 1
        gates.gate("slow").set()
        assert preparer.wait(30)
        (slow,) = preparer.take_ready()
        assert slow.prepared == "SLOW" and slow.error is None
    finally:
        for gate in gates.gates.values():
            gate.set()
        preparer.close()


def test_an_error_comes_back_with_its_job() -> None:
    gates = Gates()
    preparer = Preparer(gates.prepare, threads=1)
    try:
        preparer.submit("bad-1", "bad-1")
        gates.gate("bad-1").set()
        assert preparer.wait(30)
        (done,) = preparer.take_ready()
        assert isinstance(done.error, ValueError) and done.prepared is None
    finally:
        preparer.close()


def test_dropped_jobs_never_come_back() -> None:
    gates = Gates()
    preparer = Preparer(gates.prepare, threads=1)
    try:
        for name in ("x", "y", "z"):
            preparer.submit(name, name)
        assert preparer.drop(["y", "z"]) == ["y", "z"]
        for gate in ("x", "y", "z"):
            gates.gate(gate).set()
        assert ready_ids(preparer, 1) == ["x"]
        assert not preparer and preparer.take_ready() == []
    finally:
        preparer.close()


def test_at_least_one_thread() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Preparer(str, threads=0)
