"""Requests sent on a keep-alive connection just as the server closes it for idleness: a client's pool and the
server each time idle connections out, and when the server's time is not longer, a request sent in that instant is
reset before any response (the client cannot tell whether its job started).

    python -m bench.keep_alive [--seconds 60] [--cpu-hogs 2] [--out keep_alive.json]

A bare uvicorn app, once with uvicorn's default idle timeout (5 s, as httpx's pool) and once with the controller's
(`broker.app.KEEP_ALIVE_S`), side by side in one run: rounds of 100 httpx clients each send a request, wait
4.95-5.02 s (just under httpx's 5 s expiry, so the pool reuses the connection), and send another. `--cpu-hogs`
busy loops load the cores, which widens the moment in which both sides act.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import time

import httpx

from broker.app import KEEP_ALIVE_S
from cli.processes import wait_until
from infra.embedded_redis import free_port

CLIENTS_PER_ROUND = 100
IDLE_S = (4.95, 5.02)


async def _app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve(port: int, keep_alive_s: float) -> None:
    import uvicorn

    uvicorn.run(_app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=keep_alive_s)


def _hog() -> None:
    while True:
        pass


async def _pair(url: str, idle_s: float, failures: list[str]) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        await client.get(url)
        await asyncio.sleep(idle_s)  # the idle time under test
        try:
            await client.get(url)
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)


async def _rounds(url: str, seconds: float) -> tuple[int, list[str]]:
    failures: list[str] = []
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.gather(*(_pair(url, random.uniform(*IDLE_S), failures) for _ in range(CLIENTS_PER_ROUND)))
        sent += CLIENTS_PER_ROUND
    return sent, failures


def measure(keep_alive_s: float, seconds: float) -> dict:
    port = free_port()
    server = multiprocessing.Process(target=_serve, args=(port, keep_alive_s), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: httpx.get(url, timeout=1).status_code == 200, 30, "the server")
        sent, failures = asyncio.run(_rounds(url, seconds))
    finally:
        server.terminate()
        server.join()
    return {"server_keep_alive_s": keep_alive_s, "requests": sent, "failed": len(failures),
            "errors": sorted(set(failures))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keep_alive", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="of rounds for each server setting")
    parser.add_argument("--cpu-hogs", type=int, default=2)
    parser.add_argument("--out", default="keep_alive.json")
    args = parser.parse_args(argv)
    hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(args.cpu_hogs)]
    for hog in hogs:
        hog.start()
    try:
        rows = [measure(5.0, args.seconds), measure(KEEP_ALIVE_S, args.seconds)]
    finally:
        for hog in hogs:
            hog.terminate()
    print(f"second request after {IDLE_S[0]}-{IDLE_S[1]} s idle (httpx pool: 5 s), {args.cpu_hogs} busy loops")
    print(f"  {'server keep-alive':<18} {'requests':>9} {'failed':>7}  errors")
    for row in rows:
        errors = ", ".join(row["errors"]) or "-"
        print(f"  {row['server_keep_alive_s']:<18g} {row['requests']:>9} {row['failed']:>7}  {errors}")
    with open(args.out, "w") as out:
        json.dump({"cpu_hogs": args.cpu_hogs, "idle_s": IDLE_S, "rows": rows}, out, indent=2)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
