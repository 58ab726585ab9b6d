"""The controller keeps an idle keep-alive connection open for longer than clients' connection pools do. When the
server closes first, a request a client sends on the connection at that instant is reset before any response
(httpx and uvicorn both defaulted to 5 s: 20 of 700 requests sent after 4.95-5.02 s idle failed), and the client
cannot tell whether its job started."""

from __future__ import annotations

import socket
import time

from cli.processes import start_controller

# longer than httpx's pool expiry (5 s) and uvicorn's default keep-alive (5 s)
IDLE_S = 6.0


def get_healthz(sock: socket.socket) -> bytes:
    """One GET /healthz on `sock`: the whole response (head and body, by its Content-Length), b"" if it closed."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: controller\r\nConnection: keep-alive\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            return reply
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_an_idle_connection_still_serves_after_a_client_pool_would_have_dropped_it(redis_url, tmp_path):
    proc, url = start_controller(redis_url, tmp_path)
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            assert get_healthz(sock).startswith(b"HTTP/1.1 200")
            time.sleep(IDLE_S)  # the idle time under test, not a wait for something to happen
            try:
                second = get_healthz(sock)
            except ConnectionResetError:
                second = b"(reset)"
            assert second.startswith(b"HTTP/1.1 200"), f"after {IDLE_S:g} s idle the connection gave {second[:40]!r}"
    finally:
        proc.stop()
