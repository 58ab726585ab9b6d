"""The clients of the fault benchmarks (`bench.chaos` and its partition run) and how each request ended.

Clients keep `in_flight` SSE streams open at all times, spread over the live controllers. Every request ends as
one of: done (and right), error by code, cut (its controller was killed: the client sees the connection close,
which is all a dead process can give), lost (neither done nor error, or a `done` whose text or seq is wrong) or hung
(nothing final within the stream timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from bench.load_checks import check_stream, load_request
from contract import keys
from contract.client import aiter_events, error_from_response
from contract.messages import DoneEvent, ErrorEvent, StreamEvent, TokenEvent

# Tokens per reply, cycled over requests: short ones keep requests flowing, long ones are running when a fault hits.
REPLY_TOKENS = (16, 48, 120)
PROBLEMS_KEPT = 50


@dataclass
class RequestRecord:
    index: int
    controller: int
    phase: str
    tokens: int
    sent_at: float
    job_id: str | None = None
    outcome: str = "hung"  # done, error:<code>, cut, lost, hung
    problem: str | None = None
    ended_at: float | None = None  # perf_counter of the final event (or of the failure)
    tokens_received: int = 0
    accepted: bool = False  # the controller answered 200 and began the stream


@dataclass
class Outcomes:
    """How the requests of a run ended, counted."""

    requests: int = 0
    done: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cut: int = 0
    lost: int = 0
    hung: int = 0
    problems: list[str] = field(default_factory=list)  # one line per lost or hung request, the first PROBLEMS_KEPT


def count_outcomes(records: list[RequestRecord]) -> Outcomes:
    outcomes = Counter(r.outcome for r in records)
    return Outcomes(
        requests=len(records), done=outcomes["done"], cut=outcomes["cut"], lost=outcomes["lost"],
        hung=outcomes["hung"],
        errors={k.split(":", 1)[1]: v for k, v in sorted(outcomes.items()) if k.startswith("error:")},
        problems=[f"request {r.index} ({r.phase}, job {r.job_id}): {r.outcome}: {r.problem}"
                  for r in records if r.outcome in ("lost", "hung")][:PROBLEMS_KEPT],
    )  # fmt: skip


class Clients:
    """Keeps `in_flight` streams open over the live controllers until `stopping`, records how each one ends.
    `engine` "scripted" checks every reply word for word; any other engine only its consistency."""

    def __init__(self, urls: list[str], model: str, engine: str, in_flight: int, stream_timeout_s: float) -> None:
        self.urls = urls
        self.model = model
        self.engine = engine
        self.in_flight = in_flight
        self.stream_timeout_s = stream_timeout_s
        self.records: list[RequestRecord] = []
        self.phase = "start"
        self.live_controllers = list(range(len(urls)))
        self.killed_controller: int | None = None
        self.controller_killed_at = 0.0  # Unix time, as job records keep theirs
        self.stopping = False

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.in_flight * 2 + 8)
        timeout = httpx.Timeout(10.0, read=self.stream_timeout_s)
        # trust_env off: the controllers are on this machine or its namespace bridge, never behind a proxy
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
            tasks: set[asyncio.Task] = set()
            while not self.stopping:
                while len(tasks) < self.in_flight and not self.stopping:
                    tasks.add(asyncio.create_task(self.one(client, len(self.records))))
                finished, tasks = await asyncio.wait(tasks, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
            if tasks:
                await asyncio.wait(tasks)

    async def one(self, client: httpx.AsyncClient, index: int) -> None:
        controller = self.live_controllers[index % len(self.live_controllers)]
        tokens = REPLY_TOKENS[index % len(REPLY_TOKENS)]
        record = RequestRecord(index, controller, self.phase, tokens, time.perf_counter())
        self.records.append(record)
        body = load_request(index, tokens, self.model).model_dump(mode="json")
        events: list[tuple[float, StreamEvent]] = []
        try:
            await asyncio.wait_for(self._stream(client, controller, body, record, events), self.stream_timeout_s)
        except asyncio.TimeoutError:
            record.outcome, record.problem = "hung", f"no final event within {self.stream_timeout_s:g} s"
            return
        except httpx.HTTPError as exc:
            if self.killed_controller == controller:
                record.outcome = "cut"
            else:
                where = f"controller {controller} ({self.urls[controller]})"
                record.outcome, record.problem = "lost", f"{type(exc).__name__} from {where}: {exc!r}"
            record.ended_at = time.perf_counter()
            return
        record.ended_at = time.perf_counter()
        self._judge(record, events)

    async def _stream(self, client, controller: int, body: dict, record: RequestRecord, events: list) -> None:
        url = f"{self.urls[controller]}/api/v1/generate"
        async with client.stream("POST", url, json=body) as response:
            record.job_id = response.headers.get("x-job-id")
            record.accepted = response.status_code == 200
            if not record.accepted:
                await response.aread()
                record.outcome = f"error:{error_from_response(response).code}"
                return
            async for event in aiter_events(response):
                events.append((time.perf_counter(), event))
                if isinstance(event, TokenEvent):
                    record.tokens_received += 1
                record.job_id = record.job_id or event.job_id

    def _judge(self, record: RequestRecord, events: list) -> None:
        if record.outcome.startswith("error:"):
            return
        final = events[-1][1] if events else None
        if isinstance(final, ErrorEvent):
            record.outcome = f"error:{final.code}"
            record.ended_at = events[-1][0]
            return
        if not isinstance(final, DoneEvent):
            record.outcome, record.problem = "lost", f"the stream ended after {len(events)} events with no final one"
            return
        if self.engine == "scripted":
            problem = check_stream(record.index, record.tokens, events, record.job_id)
        else:
            problem = consistency(events)
        record.outcome, record.problem = ("lost", problem) if problem else ("done", None)


def consistency(events: list) -> str | None:
    """For a model whose reply is not known in advance: seq 1, 2, ... and the done text is the tokens joined."""
    tokens = [event for _, event in events if isinstance(event, TokenEvent)]
    if [t.seq for t in tokens] != list(range(1, len(tokens) + 1)):
        return f"token seq not 1, 2, ...: {[t.seq for t in tokens][:40]}"
    if "".join(t.text for t in tokens) != events[-1][1].text:
        return "done text is not the token events joined"
    return None


def leftovers(redis, model: str) -> list[str]:
    """What a stopped system left in Redis that nothing will clean: job tables, queued jobs, started-registry
    entries, keys of ours with no TTL."""
    left = []
    queue = keys.rq_queue(model)
    if n := redis.llen(queue):
        left.append(f"{n} job(s) in {queue}")
    if n := redis.zcard(keys.rq_registry("wip", model)):
        left.append(f"{n} job(s) in rq's started registry")
    for key in redis.scan_iter(match=f"{keys.PREFIX}*", count=1000):
        name = key.decode()
        if name in (keys.feedback(), keys.replays()):
            continue
        if redis.ttl(name) == -1:
            left.append(f"{name} has no TTL ({redis.type(name).decode()})")
    return left
