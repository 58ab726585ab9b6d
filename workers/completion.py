"""Running jobs through an engine in-process until it is idle, and each job's whole reply: for benchmarks, tests
and evaluation, which need no worker and no Redis. Works with any `Engine` (`workers.engine_types`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.errors import LlavaError
from contract.messages import FinishReason, Usage
from workers.engine_types import Engine, EngineJob


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason | None
    usage: Usage
    error: LlavaError | None = None
    token_ids: list[int] = field(default_factory=list)


def run_to_completion(engine: Engine, jobs: list[EngineJob]) -> dict[str, Completion]:
    """Run `jobs` through `engine` (admitting each as capacity allows) until it is idle; collect each job's
    whole text, including jobs admitted before the call."""
    waiting = [engine.prepare(job) for job in jobs]
    results = {job.job_id: Completion("", None, Usage()) for job in jobs}
    while waiting or engine.has_work():
        while waiting and engine.fits(waiting[0]):
            engine.add(waiting.pop(0))
        if waiting and not engine.has_work():
            raise RuntimeError(f"job {waiting[0].job_id} never fits the engine's token budget")
        for update in engine.step():
            result = results.setdefault(update.job_id, Completion("", None, Usage()))
            result.text += update.text
            result.usage = update.usage
            result.token_ids += update.token_ids
            if update.finish_reason is not None:
                result.finish_reason = update.finish_reason
                result.error = update.error
    return results
