"""Fetching `image_url` http(s) images (only with `--allow-remote-images`), without becoming a proxy into the
private network.

Every hop resolves the host and refuses it when any address is private, loopback, link-local, multicast,
reserved or unspecified; the connection then goes to the address that was checked (the host name is kept for
the Host header and TLS), so a second DNS answer cannot swap in another address. Redirects are followed by hand,
each one checked the same way. Size is capped by Content-Length and by the bytes read; time by one deadline.
A request's URLs are counted and parsed, all of them, before the first is fetched: a malformed one is a 400
naming the image, never a fetch.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import httpx

from broker.images import image_name
from contract.errors import ImageInvalid, ImageTooLarge, InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_HOST_LENGTH = 253  # the longest DNS name
_SHOWN_URL_LENGTH = 100
Resolver = Callable[[str, int], Awaitable[list[str]]]


def blocked_address(address: IPAddress) -> bool:
    """True for any address that is not globally routable unicast (IPv4-mapped IPv6 judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class RemoteImagePolicy:
    max_bytes: int
    timeout_s: float = 5.0
    max_redirects: int = 3
    resolve: Resolver = resolve_host
    is_blocked: Callable[[IPAddress], bool] = blocked_address
    user_agent: str = "llava-serve image fetcher"
    transport: httpx.AsyncBaseTransport | None = field(default=None, compare=False)


def _is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def _shown(url: str | httpx.URL) -> str:
    text = str(url)
    return text if len(text) <= _SHOWN_URL_LENGTH else text[: _SHOWN_URL_LENGTH - 3] + "..."


def parse_remote_url(url: str | httpx.URL, name: str) -> httpx.URL:
    """`url` parsed, when it is an http(s) URL with a host, a valid port and no credentials; else ImageInvalid
    (400) naming the image. Resolving and address checks come later, at fetch time."""
    try:
        parsed = httpx.URL(url)
        host, port, scheme, userinfo = parsed.host, parsed.port, parsed.scheme, parsed.userinfo
    except Exception as exc:  # noqa: BLE001 - httpx and idna raise several types for a malformed URL
        raise ImageInvalid(f"{name}: {_shown(repr(str(url)))} is not a valid URL ({_shown(str(exc))})") from exc
    if scheme not in {"http", "https"}:
        raise ImageInvalid(f"{name}: only http and https URLs can be fetched")
    if userinfo:
        raise ImageInvalid(f"{name}: URLs with credentials are not fetched")
    if not host:
        raise ImageInvalid(f"{name}: URL {_shown(parsed)} has no host")
    if len(host) > MAX_HOST_LENGTH:
        raise ImageInvalid(f"{name}: the host of {_shown(parsed)} is longer than {MAX_HOST_LENGTH} characters")
    if port is not None and not 1 <= port <= 65535:
        raise ImageInvalid(f"{name}: URL {_shown(parsed)} has port {port}, outside 1-65535")
    return parsed


async def _checked_address(url: httpx.URL, name: str, policy: RemoteImagePolicy) -> str:
    """The address to connect to for `url`, after checking every address its host resolves to."""
    host = url.host
    if not host:
        raise ImageInvalid(f"{name}: URL {url} has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = await policy.resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise ImageInvalid(f"{name}: cannot resolve host {_shown(repr(host))} ({_shown(str(exc))})") from exc
    if not addresses:
        raise ImageInvalid(f"{name}: host {host!r} has no address")
    for address in addresses:
        if policy.is_blocked(ipaddress.ip_address(address.split("%")[0])):
            raise ImageInvalid(
                f"{name}: refused to fetch {url.scheme}://{host}/...: it resolves to {address}, a private, "
                "loopback or otherwise non-public address"
            )
    return addresses[0]


async def _get_once(client: httpx.AsyncClient, url: httpx.URL, name: str, policy: RemoteImagePolicy):
    """One GET to the checked address: `(redirect URL, None)` or `(None, body bytes)`."""
    address = await _checked_address(url, name, policy)
    host_header = url.netloc.decode("ascii")
    pinned = url.copy_with(host=address)
    request = client.build_request(
        "GET",
        pinned,
        headers={"Host": host_header, "User-Agent": policy.user_agent, "Accept": "image/*"},
        extensions={"sni_hostname": url.host} if url.scheme == "https" else {},
    )
    response = await client.send(request, stream=True)
    try:
        if response.is_redirect and "location" in response.headers:
            try:
                return url.join(response.headers["location"]), None
            except Exception as exc:  # noqa: BLE001 - a malformed Location header
                raise ImageInvalid(f"{name}: {_shown(url)} redirects to a malformed URL") from exc
        if response.status_code != 200:
            raise ImageInvalid(f"{name}: fetching {url} returned HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
            raise ImageTooLarge(f"{name}: {url} is {declared} bytes, over the limit of {policy.max_bytes} bytes")
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > policy.max_bytes:
                raise ImageTooLarge(f"{name}: {url} is over the limit of {policy.max_bytes} bytes")
            chunks.append(chunk)
        return None, b"".join(chunks)
    finally:
        await response.aclose()


async def fetch_image(url: str, where: str, policy: RemoteImagePolicy, number: int | None = None) -> bytes:
    """The bytes at an http(s) `url`, within the policy's size, time, redirect and address limits."""
    name = image_name(where, number)
    current = parse_remote_url(url, name)
    try:
        with anyio.fail_after(policy.timeout_s):
            async with httpx.AsyncClient(
                follow_redirects=False, trust_env=False, timeout=policy.timeout_s, transport=policy.transport
            ) as client:
                for _ in range(policy.max_redirects + 1):
                    redirect, data = await _get_once(client, current, name, policy)
                    if data is not None:
                        return data
                    if redirect is None or redirect.scheme not in {"http", "https"}:
                        raise ImageInvalid(f"{name}: {_shown(current)} redirects to a non-http(s) URL")
                    current = parse_remote_url(redirect, name)
    except TimeoutError as exc:
        raise ImageInvalid(f"{name}: fetching {_shown(url)} took longer than {policy.timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        raise ImageInvalid(f"{name}: fetching {_shown(url)} failed ({type(exc).__name__}: {exc})") from exc
    raise ImageInvalid(f"{name}: {_shown(url)} redirects more than {policy.max_redirects} times")


async def inline_remote_images(
    sources: list[tuple[str, str]], policy: RemoteImagePolicy | None, max_images: int | None = None
) -> dict[str, str]:
    """`where -> data: URL` for each http(s) source, fetched under `policy`; without a policy (remote images off)
    the first such source is refused with a message that names the flag. The count (against `max_images`) and
    every URL are checked before the first fetch."""
    if max_images is not None and len(sources) > max_images:
        raise InvalidRequest(f"too many images: the request has {len(sources)}, the limit is {max_images} (max_images)")
    remote = [(number, where, url) for number, (where, url) in enumerate(sources, start=1) if _is_remote(url)]
    if remote and policy is None:
        number, where, _ = remote[0]
        raise ImageInvalid(
            f"{image_name(where, number)} is an http(s) URL, and this server does not fetch remote images; send the "
            "image as a data: URL (or start the controller with --allow-remote-images)"
        )
    for number, where, url in remote:
        parse_remote_url(url, image_name(where, number))
    inlined: dict[str, str] = {}
    for number, where, url in remote:
        data = await fetch_image(url, where, policy, number)
        inlined[where] = "data:;base64," + base64.b64encode(data).decode("ascii")
    return inlined
