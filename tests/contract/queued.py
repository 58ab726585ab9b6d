"""Jobs queued for the contract tests: enqueue one, read a model's queue and a worker's job table."""

from __future__ import annotations

from contract import jobs, keys
from contract.messages import JobRequest

MODEL = "m"


def enqueue(client, job_id: str, *, max_queue: int = 100) -> None:
    jobs.enqueue(client, JobRequest(job_id=job_id, model=MODEL, prompt="hi"), max_queue=max_queue, result_ttl=600)


def queue(client) -> list[str]:
    return [i.decode() for i in client.lrange(jobs.queue_for(client, MODEL).key, 0, -1)]


def table(client, worker_id: str = "w1") -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.worker_jobs(worker_id)).items()}
