"""The whole system under faults, and what happened to every request.

    python -m bench.chaos [--engine scripted|tiny] [--workers 3] [--in-flight 12] [--kills 100]
                          [--outages 2,8,20] [--restarts 1] [--cpu-hogs 2] [--no-controller-kill]
                          [--partition auto|only|off] [--partition-s 20] [--out bench/results/chaos.json]
                          [--partition-out bench/results/chaos_partition.json] [--workdir DIR]

Real processes: an embedded append-only redis-server, two `llava-serve controller` replicas and `--workers`
`llava-serve worker` processes, with either the scripted engine (workers/scripted.py: a deterministic fake engine
for fault tests of the broker, not a model, so every reply can be checked word for word) or the real tiny
random-weight LLaVA (`--engine tiny`: the reply cannot be predicted, so only its consistency is checked).
Clients keep `--in-flight` SSE streams open at all times, spread over the controllers, while three phases run:

1. worker deaths: `--kills` times, a random worker gets SIGKILL or SIGSTOP (mixed) and a replacement starts; a
   stopped worker is woken (SIGCONT) after the death-detection bound and then stopped, to check that it does not
   publish into streams another worker now owns; `--cpu-hogs` busy processes load every core meanwhile, so a live
   worker whose heartbeat competes for the CPU must still never be swept;
2. Redis: `--restarts` restarts, then outages of `--outages` seconds each (the server stopped and started again on
   the same port with its append-only file);
3. one controller of the two killed (SIGKILL) while its streams run.

Every request ends as one of: done (and right), error by code, cut (its controller was killed: the client sees the
connection close, which is all a dead process can give), lost (neither done nor error, or a `done` whose text or
seq is wrong) or hung (nothing final within the stream timeout, 120 s). Also measured: kill-to-error latency of the
streams a dead worker held (p50 / max), `worker_lost` errors of jobs no killed worker held (false sweeps), errors
during outages shorter than the controller's outage allowance (false errors), tokens generated after their
controller died (for no client), and what is left in Redis once everything has stopped. Prints a table, writes
JSON (default bench/results/chaos.json). The processes and the fault phases are in bench/chaos_system.py.

Then, with `--partition auto` (the default) where network namespaces can be made, or alone with `--partition only`,
the partition run (bench/chaos_partition.py, scripted engine): every process on a host of its own, one worker cut
from Redis for `--partition-s` seconds under the same load. Its own table and JSON (`--partition-out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.chaos_partition import PartitionConfig, run_partition
from bench.chaos_partition import failed as partition_failed
from bench.chaos_partition import print_table as print_partition_table
from bench.chaos_requests import Clients, count_outcomes, leftovers
from bench.chaos_system import ChaosConfig, Kill, System, fault_schedule
from bench.common import percentile
from cli.netns import unavailable_reason
from contract import keys
from contract.client import ControllerClient

OUTAGE_ALLOWANCE_S = 30.0  # the controller's default Redis outage allowance
LEASE_CHECK_MARGIN_S = 1.0  # a worker sees a lease gone at its next step or claim after the TTL


@dataclass
class ChaosReport:
    config: dict
    requests: int = 0
    worker_kills: int = 0
    jobs_held_by_killed: int = 0  # jobs in the job tables of killed workers at the moment of the kill
    done: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cut: int = 0
    lost: int = 0
    hung: int = 0
    kill_to_error_p50_s: float | None = None
    kill_to_error_max_s: float | None = None
    false_worker_lost: int = 0
    false_outage_errors: int = 0  # accepted streams that ended in an error during an outage within the allowance
    refused_in_outages: int = 0  # requests refused on arrival (503) while Redis was down
    orphan_tokens: int = 0
    orphan_jobs: int = 0  # jobs of the killed controller still running once its lease ran out
    leftover: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per lost or hung request
    wall_s: float = 0.0


def measure(system: System, clients: Clients, kills: list[Kill], outages: list[tuple[float, float, float]],
            config: ChaosConfig) -> ChaosReport:  # fmt: skip
    report = ChaosReport(config={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()})
    records = clients.records
    outcomes = count_outcomes(records)
    report.requests, report.done, report.errors = outcomes.requests, outcomes.done, outcomes.errors
    report.cut, report.lost, report.hung = outcomes.cut, outcomes.lost, outcomes.hung
    report.problems = outcomes.problems

    held_by = {job_id: kill for kill in kills for job_id in kill.held}
    report.worker_kills, report.jobs_held_by_killed = len(kills), len(held_by)
    latencies = []
    for r in records:
        if r.outcome != "error:worker_lost":
            continue
        kill = held_by.get(r.job_id or "")
        if kill is None:
            report.false_worker_lost += 1
        elif r.ended_at is not None:
            latencies.append(r.ended_at - kill.at)
    if latencies:
        report.kill_to_error_p50_s = round(percentile(latencies, 50), 2)
        report.kill_to_error_max_s = round(max(latencies), 2)

    short = [(start, end) for start, end, duration in outages if duration < OUTAGE_ALLOWANCE_S]
    for r in records:
        if r.phase == "redis" and r.outcome.startswith("error:") and r.outcome != "error:worker_lost":
            if any(r.sent_at <= end and (r.ended_at or end) >= start for start, end in short):
                if r.accepted:
                    report.false_outage_errors += 1
                else:
                    report.refused_in_outages += 1

    if config.controller_kill:
        report.orphan_jobs, report.orphan_tokens = _orphans(system, clients)
    return report


def _orphans(system: System, clients: Clients) -> tuple[int, int]:
    """Jobs of the killed controller still generating once its lease had run out (neither done nor cancelled by
    then), and the tokens made after their client was cut."""
    cut = [r for r in clients.records if r.outcome == "cut" and r.job_id]
    bound = clients.controller_killed_at + keys.CONTROLLER_LEASE_TTL_S + LEASE_CHECK_MARGIN_S
    client = ControllerClient(system.urls[0])
    jobs, tokens = 0, 0
    deadline = time.monotonic() + 60
    try:
        for r in cut:
            outcome = client.job(r.job_id).outcome
            while outcome is None and time.monotonic() < deadline:
                time.sleep(0.2)  # polling a record that a worker will write; the deadline bounds it
                outcome = client.job(r.job_id).outcome
            if outcome is None or (outcome.timings.finished_at or bound + 1) > bound:
                jobs += 1  # still running, or ended only after its controller's lease had run out
            if outcome is not None:
                tokens += max(0, outcome.usage.completion_tokens - r.tokens_received)
    finally:
        client.close()
    return jobs, tokens


def run_chaos(config: ChaosConfig, workdir: Path | None = None) -> ChaosReport:
    """Start the system, run the phases with clients in flight, stop everything and report."""
    with tempfile.TemporaryDirectory(prefix="llava-chaos-") as tmp:
        workdir = workdir or Path(tmp)
        system = System(config, workdir)
        kills: list[Kill] = []
        outages: list[tuple[float, float, float]] = []
        started = time.perf_counter()
        try:
            system.start()
            clients = Clients(system.urls, system.model, config.engine, config.in_flight, config.stream_timeout_s)
            # Faults run on this thread: children die with the thread that started them (PR_SET_PDEATHSIG).
            streams = threading.Thread(target=asyncio.run, args=(clients.run(),))
            streams.start()
            try:
                fault_schedule(system, clients, config, kills, outages)
            finally:
                clients.stopping = True
                streams.join()
            report = measure(system, clients, kills, outages, config)
            for proc in [*system.workers.values(), *system.retired, *system.controllers]:
                proc.signal(signal.SIGCONT)
                proc.stop()
            report.leftover = leftovers(system.redis, system.model)
        finally:
            system.stop()
        report.wall_s = round(time.perf_counter() - started, 1)
        return report


def print_table(report: ChaosReport) -> None:
    errors = ", ".join(f"{code} {n}" for code, n in report.errors.items()) or "none"
    rows = [
        ("worker kills / jobs they held", f"{report.worker_kills} / {report.jobs_held_by_killed}"),
        ("requests", report.requests), ("done", report.done), ("error by code", errors),
        ("cut (controller killed)", report.cut),
        ("lost", report.lost), ("hung", report.hung),
        ("kill→error p50 / max (s)", f"{report.kill_to_error_p50_s} / {report.kill_to_error_max_s}"),
        ("false worker_lost (live worker swept)", report.false_worker_lost),
        ("accepted streams failed in outages within the allowance", report.false_outage_errors),
        ("requests refused on arrival (503) while Redis was down", report.refused_in_outages),
        ("jobs past the lease / tokens for no client", f"{report.orphan_jobs} / {report.orphan_tokens}"),
        ("left in Redis", len(report.leftover)), ("wall (s)", report.wall_s),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print(f"chaos run, engine {report.config['engine']}, {report.config['kills']} worker kills")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for line in [*report.problems[:10], *report.leftover[:10]]:
        print(f"  ! {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["scripted", "tiny"], default="scripted")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=12, help="streams kept open at all times")
    parser.add_argument("--kills", type=int, default=100, help="worker kills (SIGKILL and SIGSTOP mixed)")
    parser.add_argument("--kill-interval-s", type=float, default=1.5)
    parser.add_argument("--restarts", type=int, default=1, help="Redis restarts (down and straight back up)")
    parser.add_argument("--outages", default="2,8,20", help="Redis outages, seconds each, comma separated")
    parser.add_argument("--no-controller-kill", action="store_true")
    parser.add_argument("--cpu-hogs", type=int, default=2, help="busy processes beside the workers during the kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition", choices=["auto", "only", "off"], default="auto",
                        help="the partition run (scripted engine, network namespaces): auto runs it after the "
                             "faults above where namespaces can be made, only runs it alone")  # fmt: skip
    parser.add_argument("--partition-s", type=float, default=20.0, help="how long the worker is cut from Redis")
    parser.add_argument("--out", type=Path, default=Path("bench/results/chaos.json"))
    parser.add_argument("--partition-out", type=Path, default=Path("bench/results/chaos_partition.json"))
    parser.add_argument("--workdir", type=Path, help="keep Redis's files and every process's log of the fault run "
                        "here (default: a temporary directory, removed at the end)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.partition_s <= 0:
        parser.error(f"--partition-s must be above 0 s, not {args.partition_s:g}")
    unavailable = unavailable_reason() if args.partition != "off" else None
    if args.partition == "only" and unavailable is not None:
        print(f"the partition run needs network namespaces, which cannot be made here: {unavailable}")
        return 2
    bad = False
    if args.partition != "only":
        config = ChaosConfig(
            engine=args.engine, workers=args.workers, in_flight=args.in_flight, kills=args.kills,
            kill_interval_s=args.kill_interval_s, restarts=args.restarts, controller_kill=not args.no_controller_kill,
            cpu_hogs=args.cpu_hogs,
            outages_s=tuple(float(s) for s in args.outages.split(",") if s.strip()), seed=args.seed,
        )  # fmt: skip
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
        report = run_chaos(config, args.workdir)
        print_table(report)
        _write(args.out, asdict(report))
        bad = bool(report.lost or report.hung or report.false_worker_lost or report.false_outage_errors
                   or report.leftover)  # fmt: skip
    if args.partition != "off":
        if unavailable is not None:
            print(f"partition run skipped: network namespaces cannot be made here: {unavailable}")
        else:
            partition = run_partition(PartitionConfig(in_flight=args.in_flight, partition_s=args.partition_s))
            print_partition_table(partition)
            _write(args.partition_out, asdict(partition))
            bad = bad or partition_failed(partition)
    return 1 if bad else 0


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    raise SystemExit(main())
