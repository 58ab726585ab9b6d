"""What each stream of the load benchmark must get back, and what a finished run must not leave in Redis.

The requests are for the scripted engine (workers/scripted.py), a deterministic fake engine for load and fault tests
of the broker, not a model: its reply to a prompt is known in advance, so every stream can be checked word for word.
"""

from __future__ import annotations

import base64
from collections import Counter
from dataclasses import dataclass, field

from bench.common import png_bytes, question
from contract import jobs, keys
from contract.messages import DoneEvent, ErrorEvent, GenerateRequest, StreamEvent, TokenEvent

MODEL = "scripted-load"
ENGINE_NOTE = "scripted (workers/scripted.py): a deterministic fake engine for load tests of the broker, not a model"


def load_request(i: int, tokens: int, model: str = MODEL) -> GenerateRequest:
    """Request `i`: one image and a question; the scripted engine's `[[tokens=N]]` marker asks for `tokens`."""
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(i)).decode()
    text = f"{question(i)} [[tokens={tokens}]]"
    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": text}]
    return GenerateRequest.model_validate({
        "model": model, "messages": [{"role": "user", "content": content}],
        "temperature": 0.0, "max_new_tokens": tokens,
    })  # fmt: skip


def scripted_reply(i: int, tokens: int) -> str:
    """What the scripted engine promises for request `i`: the words of its question, cycled, `tokens` of them."""
    words = question(i).split()
    return " ".join(words[k % len(words)] for k in range(tokens))


@dataclass
class StreamResult:
    index: int
    job_id: str | None
    problem: str | None  # None: the stream passed every check
    token_events: int
    ttft: float | None  # seconds from sending the request to the first token event
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive token events


Arrival = tuple[float, StreamEvent]


def check_stream(index: int, tokens: int, events: list[Arrival], header_job_id: str | None) -> str | None:
    """Why stream `index` is wrong (None when it is right): one `done` last, after `token` events with seq 1, 2,
    ..., whose text joins to the done text, the scripted reply of its prompt, `tokens` completion tokens."""
    kinds = [event.type for _, event in events]
    if not events:
        return "no event at all"
    if "error" in kinds:
        error = next(event for _, event in events if isinstance(event, ErrorEvent))
        return f"error event {error.code}: {error.message}"
    done = events[-1][1]
    if not isinstance(done, DoneEvent) or kinds.count("done") != 1:
        return f"the stream does not end with exactly one done (events {dict(Counter(kinds))}, last {kinds[-1]})"
    first_token = kinds.index("token") if "token" in kinds else len(kinds) - 1
    if "queued" in kinds[first_token:]:
        return "a queued event after the first token"
    job_ids = {event.job_id for _, event in events}
    if len(job_ids) != 1 or (header_job_id is not None and job_ids != {header_job_id}):
        return f"events of more than one job: {sorted(job_ids)} (header {header_job_id})"
    token_events = [event for _, event in events if isinstance(event, TokenEvent)]
    seqs = [event.seq for event in token_events]
    if seqs != list(range(1, len(seqs) + 1)):
        return f"token seq not 1, 2, ... {len(seqs)}: {seqs[:40]}"
    streamed = "".join(event.text for event in token_events)
    if done.text != streamed:
        return f"done text ({len(done.text)} chars) is not the token events joined ({len(streamed)} chars)"
    expected = scripted_reply(index, tokens)
    if done.text != expected:
        return f"text is not the scripted reply of request {index}: {done.text[:80]!r} vs {expected[:80]!r}"
    if done.usage.completion_tokens != tokens:
        return f"{done.usage.completion_tokens} completion tokens, not {tokens}"
    return None


def leftover_jobs(redis, job_ids: list[str], model: str = MODEL) -> list[str]:
    """What a finished run left that it should not have: jobs still queued, started, failed or cancelled, entries
    in live workers' job tables or inboxes, cancel flags, and given jobs whose record is not `finished`."""
    from rq import registry as rq_registry

    queue = jobs.queue_for(redis, model)
    left = []
    if queue.count:
        left.append(f"{queue.count} job(s) still in queue {queue.name}")
    for name in ("StartedJobRegistry", "FailedJobRegistry", "CanceledJobRegistry", "DeferredJobRegistry",
                 "ScheduledJobRegistry"):  # fmt: skip
        if count := getattr(rq_registry, name)(queue=queue).count:
            left.append(f"{count} job(s) in rq's {name}")
    for raw in redis.smembers(keys.workers()):
        worker_id = raw.decode() if isinstance(raw, bytes) else raw
        if held := redis.hlen(keys.worker_jobs(worker_id)):
            left.append(f"{held} job(s) in the job table of worker {worker_id}")
        if inbox := redis.llen(keys.worker_inbox(worker_id)):
            left.append(f"{inbox} job(s) in the inbox of worker {worker_id}")
    if flags := sum(redis.exists(keys.cancel(job_id)) for job_id in job_ids):
        left.append(f"{flags} cancel flag(s)")
    statuses = [view.status if view else "missing" for view in (jobs.view(redis, job_id) for job_id in job_ids)]
    if not_finished := [s for s in statuses if s != "finished"]:
        left.append(f"{len(not_finished)} job record(s) not finished: {sorted(set(not_finished))}")
    return left
