"""Fetching `image_url` http(s) images (only with `--allow-remote-images`), without becoming a proxy into the
private network.

Every hop resolves the host and refuses it when any address is private, loopback, link-local, multicast,
reserved or unspecified; the connection then goes to the address that was checked (the host name is kept for
the Host header and TLS), so a second DNS answer cannot swap in another address. Redirects are followed by hand,
each one checked the same way. Size is capped by Content-Length and by the bytes read; time by one deadline.
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

from contract.errors import ImageInvalid, ImageTooLarge

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
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


async def _checked_address(url: httpx.URL, where: str, policy: RemoteImagePolicy) -> str:
    """The address to connect to for `url`, after checking every address its host resolves to."""
    host = url.host
    if not host:
        raise ImageInvalid(f"image at {where}: URL {url} has no host")
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
        except OSError as exc:
            raise ImageInvalid(f"image at {where}: cannot resolve host {host!r} ({exc})") from exc
    if not addresses:
        raise ImageInvalid(f"image at {where}: host {host!r} has no address")
    for address in addresses:
        if policy.is_blocked(ipaddress.ip_address(address.split("%")[0])):
            raise ImageInvalid(
                f"image at {where}: refused to fetch {url.scheme}://{host}/...: it resolves to {address}, a private, "
                "loopback or otherwise non-public address"
            )
    return addresses[0]


async def _get_once(client: httpx.AsyncClient, url: httpx.URL, where: str, policy: RemoteImagePolicy):
    """One GET to the checked address: `(redirect URL, None)` or `(None, body bytes)`."""
    address = await _checked_address(url, where, policy)
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
            return url.join(response.headers["location"]), None
        if response.status_code != 200:
            raise ImageInvalid(f"image at {where}: fetching {url} returned HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
            raise ImageTooLarge(
                f"image at {where}: {url} is {declared} bytes, over the limit of {policy.max_bytes} bytes"
            )
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > policy.max_bytes:
                raise ImageTooLarge(f"image at {where}: {url} is over the limit of {policy.max_bytes} bytes")
            chunks.append(chunk)
        return None, b"".join(chunks)
    finally:
        await response.aclose()


async def fetch_image(url: str, where: str, policy: RemoteImagePolicy) -> bytes:
    """The bytes at an http(s) `url`, within the policy's size, time, redirect and address limits."""
    current = httpx.URL(url)
    if current.scheme not in {"http", "https"}:
        raise ImageInvalid(f"image at {where}: only http and https URLs can be fetched")
    if current.userinfo:
        raise ImageInvalid(f"image at {where}: URLs with credentials are not fetched")
    try:
        with anyio.fail_after(policy.timeout_s):
            async with httpx.AsyncClient(
                follow_redirects=False, trust_env=False, timeout=policy.timeout_s, transport=policy.transport
            ) as client:
                for _ in range(policy.max_redirects + 1):
                    redirect, data = await _get_once(client, current, where, policy)
                    if data is not None:
                        return data
                    if redirect is None or redirect.scheme not in {"http", "https"}:
                        raise ImageInvalid(f"image at {where}: {current} redirects to a non-http(s) URL")
                    current = redirect
    except TimeoutError as exc:
        raise ImageInvalid(f"image at {where}: fetching {url} took longer than {policy.timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        raise ImageInvalid(f"image at {where}: fetching {url} failed ({type(exc).__name__}: {exc})") from exc
    raise ImageInvalid(f"image at {where}: {url} redirects more than {policy.max_redirects} times")


async def inline_remote_images(sources: list[tuple[str, str]], policy: RemoteImagePolicy | None) -> dict[str, str]:
    """`where -> data: URL` for each http(s) source, fetched under `policy`; without a policy (remote images off)
    the first such source is refused with a message that names the flag."""
    inlined: dict[str, str] = {}
    for where, url in sources:
        if not _is_remote(url):
            continue
        if policy is None:
            raise ImageInvalid(
                f"image at {where} is an http(s) URL, and this server does not fetch remote images; send the image "
                "as a data: URL (or start the controller with --allow-remote-images)"
            )
        data = await fetch_image(url, where, policy)
        inlined[where] = "data:;base64," + base64.b64encode(data).decode("ascii")
    return inlined
