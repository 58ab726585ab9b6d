"""Lifecycle tests: the exact Redis keys (and TTLs) a job leaves after success, failure and cancel (arq's
`test_remain_keys`); worker death is covered in tests/broker/test_sweeper.py and test_worker_process.py."""

from __future__ import annotations

from contract import jobs, keys
from tests.workers.harness import MODEL, RunningWorker, key_ttls, make_worker, status, submit, wait_for

Q = f"llava:{MODEL}"


def _settled(client, job_id: str, expected: str) -> None:
    wait_for(lambda: status(client, job_id) == expected, what=f"{job_id} {expected}")
    wait_for(lambda: not client.exists(keys.worker_jobs("w1")), what="the job table emptied")


def _assert_keys(left: dict[str, int], expected: dict[str, tuple[int, int]]) -> None:
    assert set(left) == set(expected), f"keys left: {sorted(left)}"
    for key, (low, high) in expected.items():
        assert low <= left[key] <= high, f"{key} has TTL {left[key]}, expected {low}..{high}"


NO_TTL = (-1, -1)
RESULT_TTL = (1, 600)
WORKER = {"llava:worker:w1": (1, keys.WORKER_TTL_S), "llava:workers": NO_TTL}


def test_keys_after_success(redis_client):
    running = RunningWorker(make_worker(redis_client, reply_tokens=2)).__enter__()
    submit(redis_client, "ok").read_until_final()
    _settled(redis_client, "ok", "finished")
    common = {f"rq:finished:{Q}": NO_TTL, "rq:queues": NO_TTL, "rq:job:ok": RESULT_TTL, "rq:results:ok": RESULT_TTL}
    _assert_keys(key_ttls(redis_client), {**common, **WORKER})
    running.stop()
    _assert_keys(key_ttls(redis_client), common)


def test_keys_after_failure(redis_client):
    with RunningWorker(make_worker(redis_client)):
        submit(redis_client, "bad", "x [[invalid]]").read_until_final()
        _settled(redis_client, "bad", "failed")
    expected = {f"rq:failed:{Q}": NO_TTL, "rq:queues": NO_TTL, "rq:job:bad": RESULT_TTL, "rq:results:bad": RESULT_TTL}
    _assert_keys(key_ttls(redis_client), expected)


def test_keys_after_a_device_error(redis_client):
    with RunningWorker(make_worker(redis_client, error_after_tokens=1)):
        submit(redis_client, "dev", "x [[device-error]]").read_until_final()
        _settled(redis_client, "dev", "failed")
    expected = {f"rq:failed:{Q}": NO_TTL, "rq:queues": NO_TTL, "rq:job:dev": RESULT_TTL, "rq:results:dev": RESULT_TTL}
    _assert_keys(key_ttls(redis_client), expected)


def test_keys_after_cancel_of_a_running_job(redis_client):
    with RunningWorker(make_worker(redis_client, reply_tokens=100_000)):
        stream = submit(redis_client, "long")
        stream.wait_tokens(1)
        jobs.request_cancel(redis_client, "long", MODEL)
        stream.read_until_final()
        _settled(redis_client, "long", "canceled")
    expected = {
        f"rq:canceled:{Q}": NO_TTL,
        "rq:queues": NO_TTL,
        "rq:job:long": RESULT_TTL,
        "llava:job:long:cancel": (1, 60),  # the flag outlives the job briefly, then goes
    }
    _assert_keys(key_ttls(redis_client), expected)


def test_keys_after_cancel_of_a_queued_job(redis_client):
    submit(redis_client, "q", subscribe=False)
    jobs.request_cancel(redis_client, "q", MODEL)
    expected = {
        f"rq:canceled:{Q}": NO_TTL,
        "rq:queues": NO_TTL,
        "rq:job:q": RESULT_TTL,  # the emptied queue list is gone
        "llava:job:q:cancel": (1, 60),
    }
    _assert_keys(key_ttls(redis_client), expected)
