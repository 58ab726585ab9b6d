"""The process helpers `up`, benchmarks and tests start llava-serve processes with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cli.processes import Proc, WaitFailed, wait_until


def test_wait_until_returns_once_the_condition_holds(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    proc = Proc(
        "writer",
        [sys.executable, "-c", f"import time; open({str(marker)!r}, 'w').close(); time.sleep(600)"],
        {},
        tmp_path,
    )
    try:
        wait_until(marker.exists, 60, "the marker", [proc])
        assert proc.alive()
    finally:
        assert proc.stop(timeout_s=10) is not None
    assert not proc.alive()


def test_wait_until_fails_with_the_log_of_a_child_that_exited(tmp_path: Path) -> None:
    proc = Proc("crasher", [sys.executable, "-c", "print('model not found'); raise SystemExit(3)"], {}, tmp_path)
    try:
        with pytest.raises(WaitFailed, match=r"(?s)crasher exited with 3 while waiting for registration.*model not"):
            wait_until(lambda: False, 60, "registration", [proc])
    finally:
        proc.stop()
