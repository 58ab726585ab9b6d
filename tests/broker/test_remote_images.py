"""Fetching http(s) images: address checks on every hop, redirects, size and time limits. A local HTTP server
plays the internet; a test resolver maps made-up host names to addresses, and the policy treats 127.0.0.1 (the
local server) as public so that everything else about the fetch is exercised for real."""

from __future__ import annotations

import base64
import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.remote_images import RemoteImagePolicy, blocked_address, fetch_image, inline_remote_images
from contract.errors import ImageInvalid, ImageTooLarge, InvalidRequest
from tests.broker.scripted_worker import FAST, ScriptedWorker, png_b64, settings_for

IMAGE = base64.b64decode(png_b64(8, 8))


class Handler(BaseHTTPRequestHandler):
    seen: list[str] = []  # paths requested, in order

    def log_message(self, *args) -> None:
        return

    def do_GET(self) -> None:
        Handler.seen.append(self.path)
        port = self.server.server_address[1]
        routes = {
            "/cat.png": (200, {"Content-Type": "image/png"}, IMAGE),
            "/to-cat": (302, {"Location": "/cat.png"}, b""),
            "/to-internal": (302, {"Location": f"http://internal.test:{port}/cat.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/missing": (404, {}, b"no"),
        }
        if self.path == "/slow":
            time.sleep(1.5)
        status, headers, body = routes.get(self.path, (200, {}, IMAGE))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Seen-Host", self.headers.get("Host", ""))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[int]:
    Handler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


HOSTS = {"images.test": ["127.0.0.1"], "internal.test": ["10.0.0.7"], "mixed.test": ["127.0.0.1", "192.168.1.9"]}


async def fake_resolve(host: str, port: int) -> list[str]:
    if host not in HOSTS:
        raise OSError(f"unknown host {host}")
    return HOSTS[host]


def local_is_public(address) -> bool:
    """Blocked unless it is the test server's 127.0.0.1."""
    return address != ipaddress.ip_address("127.0.0.1") and blocked_address(address)


def policy(**overrides) -> RemoteImagePolicy:
    values = {"max_bytes": 10_000, "timeout_s": 5.0, "resolve": fake_resolve, "is_blocked": local_is_public}
    return RemoteImagePolicy(**{**values, **overrides})


def fetch(url: str, **overrides) -> bytes:
    return anyio.run(fetch_image, url, "messages[0].content[0]", policy(**overrides))


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("::1", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
    ],
)
def test_blocked_addresses(address: str, blocked: bool) -> None:
    assert blocked_address(ipaddress.ip_address(address)) is blocked


def test_fetches_from_the_checked_address_keeping_the_host(server: int) -> None:
    assert fetch(f"http://images.test:{server}/cat.png") == IMAGE


def test_follows_redirects_to_allowed_hosts(server: int) -> None:
    assert fetch(f"http://images.test:{server}/to-cat") == IMAGE


def test_refuses_a_redirect_to_a_private_address(server: int) -> None:
    with pytest.raises(ImageInvalid, match=r"internal\.test.*10\.0\.0\.7"):
        fetch(f"http://images.test:{server}/to-internal")


def test_refuses_a_host_when_any_of_its_addresses_is_private(server: int) -> None:
    with pytest.raises(ImageInvalid, match="192.168.1.9"):
        fetch(f"http://mixed.test:{server}/cat.png")


def test_redirect_limit(server: int) -> None:
    with pytest.raises(ImageInvalid, match="redirects more than 2 times"):
        fetch(f"http://images.test:{server}/loop", max_redirects=2)


def test_size_limit(server: int) -> None:
    with pytest.raises(ImageTooLarge, match=f"over the limit of {len(IMAGE) - 1} bytes"):
        fetch(f"http://images.test:{server}/cat.png", max_bytes=len(IMAGE) - 1)


def test_time_limit(server: int) -> None:
    with pytest.raises(ImageInvalid, match="took longer than 0.3 s"):
        fetch(f"http://images.test:{server}/slow", timeout_s=0.3)


def test_http_errors_and_unknown_hosts(server: int) -> None:
    with pytest.raises(ImageInvalid, match="HTTP 404"):
        fetch(f"http://images.test:{server}/missing")
    with pytest.raises(ImageInvalid, match="cannot resolve host"):
        fetch(f"http://nowhere.test:{server}/cat.png")
    with pytest.raises(ImageInvalid, match="credentials"):
        fetch(f"http://user:pw@images.test:{server}/cat.png")


def test_inline_leaves_data_urls_and_refuses_remote_without_a_policy(server: int) -> None:
    sources = [("a", "data:image/png;base64,AAAA"), ("b", f"http://images.test:{server}/cat.png")]
    inlined = anyio.run(inline_remote_images, sources, policy())
    assert list(inlined) == ["b"] and inlined["b"].startswith("data:;base64,")
    with pytest.raises(ImageInvalid, match="--allow-remote-images"):
        anyio.run(inline_remote_images, sources, None)


MALFORMED = [
    "http://[::1",
    "http://0177.0.0.1/cat.png",
    "http://[v1.x]/cat.png",
    "http://xn--/cat.png",
    "http://\x00/cat.png",
    "http://images.test:99999/cat.png",
    "http://images.test:0/cat.png",
    "http:///cat.png",
    "http://" + "a" * 300 + "/cat.png",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_are_invalid_images(server: int, url: str) -> None:
    sources = [("a", f"http://images.test:{server}/cat.png"), ("b", url)]
    with pytest.raises(ImageInvalid, match=r"^image 2 at b: ") as raised:
        anyio.run(inline_remote_images, sources, policy())
    assert len(raised.value.message) < 300
    assert Handler.seen == []  # the good URL before it was not fetched either


def test_the_image_count_is_checked_before_any_fetch(server: int) -> None:
    sources = [(f"messages[0].content[{i}]", f"http://images.test:{server}/cat.png?{i}") for i in range(20)]
    with pytest.raises(InvalidRequest, match="has 20, the limit is 8"):
        anyio.run(inline_remote_images, sources, policy(), 8)
    assert Handler.seen == []


def test_every_url_is_checked_before_any_fetch(server: int) -> None:
    sources = [("a", f"http://images.test:{server}/cat.png"), ("b", f"http://u:p@images.test:{server}/cat.png")]
    with pytest.raises(ImageInvalid, match="image 2 at b: URLs with credentials"):
        anyio.run(inline_remote_images, sources, policy())
    assert Handler.seen == []


def test_the_chat_endpoint_answers_malformed_and_too_many_urls_without_fetching(redis_url, redis_client, server):
    ScriptedWorker(redis_client, model="tiny-llava").register()
    app = create_app(settings_for(redis_url, allow_remote_images=True), timings=FAST, run_sweeper=False)
    app.state.remote_image_policy = policy()

    def chat(*urls: str) -> dict:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        return {
            "model": "tiny-llava",
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "?"}]}],
        }

    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json=chat("http://[::1"))
        assert reply.status_code == 400, reply.text
        assert "image 1 at messages[0].content[0]" in reply.json()["error"]["message"]
        many = [f"http://images.test:{server}/cat.png?{i}" for i in range(20)]
        reply = client.post("/v1/chat/completions", json=chat(*many))
        assert reply.status_code in (400, 422), reply.text
        assert "has 20, the limit is 8" in reply.json()["error"]["message"]
    assert Handler.seen == []
