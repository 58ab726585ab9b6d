"""How long `/healthz` waits while a large JSON body is parsed: the worst latency of back-to-back `/healthz` calls
during one post, for a 60 MB prompt and for a body of a million small values.

    python -m bench.body_parse --redis-url redis://127.0.0.1:6390/0 [--rounds 2]

The controller app in-process (Starlette's test client) on the given Redis, which it only reads; no worker (the
prompt is parsed, then refused with 404 for its model). Round 1 includes starting the parser's processes.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from fastapi.testclient import TestClient

from broker.app import create_app
from infra.settings import ControllerSettings

BODIES = {
    "60 MB prompt": lambda: {"model": "not-served", "messages": [{"role": "user", "content": "a" * 60_000_000}]},
    "1M small values": lambda: {"model": "not-served", "messages": [{"role": "user", "content": "a"}] * 330_000},
}


def worst_healthz_during_post(client: TestClient, body: bytes) -> tuple[int, float, float]:
    """(status of the post, seconds the post took, worst /healthz latency in seconds while it ran)."""
    replies = []
    headers = {"Content-Type": "application/json"}
    poster = threading.Thread(
        target=lambda: replies.append(client.post("/api/v1/generate", content=body, headers=headers))
    )
    started = time.perf_counter()
    poster.start()
    worst = 0.0
    while poster.is_alive():
        sent = time.perf_counter()
        client.get("/healthz")
        worst = max(worst, time.perf_counter() - sent)
    poster.join()
    return replies[0].status_code, time.perf_counter() - started, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with TestClient(create_app(ControllerSettings(redis_url=args.redis_url), run_sweeper=False)) as client:
        for name, build in BODIES.items():
            body = json.dumps(build()).encode()
            for round_number in range(1, args.rounds + 1):
                status, took_s, worst_s = worst_healthz_during_post(client, body)
                print(
                    f"{name} ({len(body) / 1e6:.0f} MB), round {round_number}: status {status}, "
                    f"post {took_s:.2f} s, worst /healthz {worst_s * 1000:.0f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
