"""Hosts of their own on this machine for tests of network faults: one Linux network namespace per process, each
with one address on a private bridge, as if every process ran on a separate host behind one switch.

The bridge lives in the root namespace with the first address of a /24 that no address or route of this machine
covers (10.213.N.0/24, the first free N from 7), so the test process reaches every host directly and traffic
never leaves these namespaces. Names carry a random run id, so parallel or leftover runs never clash.
`Network.cut(host)` takes the host's port on the bridge down: its link loses carrier and every packet to or from it
is dropped silently, as when a cable or a switch port fails; `heal(host)` brings it back. Needs root and iproute2;
`unavailable_reason()` says why namespaces cannot be made here, for a clear skip.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SUBNET_PREFIX = "10.213"
FIRST_SUBNET = 7
FIRST_HOST_OCTET = 10  # .1 is the bridge (the test process), hosts from .10
_LOCK_PATH = Path(tempfile.gettempdir()) / "llava-netns.lock"  # one subnet picked at a time across runs


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; raises RuntimeError with ip's own message when it fails and `check` is set."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why network namespaces, veth pairs and a bridge cannot be made here; None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (`ip netns add`); run as root to include this test"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    run_id = secrets.token_hex(3)
    netns, bridge, port = f"llava-probe-{run_id}", f"llpb{run_id}", f"llpv{run_id}"
    steps = [
        ("netns", "add", netns),
        ("link", "add", bridge, "type", "bridge"),
        ("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns),
        ("link", "set", port, "master", bridge),
    ]
    try:
        for step in steps:
            done = ip(*step, check=False)
            if done.returncode != 0:
                return f"`ip {' '.join(step)}` failed here: {done.stderr.strip()}"
    finally:
        ip("link", "del", port, check=False)
        ip("link", "del", bridge, check=False)
        ip("netns", "del", netns, check=False)
    return None


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine's root namespace has an address in or a route to."""
    used = []
    for entry in json.loads(ip("-j", "-4", "addr", "show").stdout or "[]"):
        for info in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst == "default" or not dst[0].isdigit():
            continue
        used.append(ipaddress.ip_network(dst, strict=False))
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _networks_in_use()
    for n in range(FIRST_SUBNET, 255):
        candidate = ipaddress.ip_network(f"{SUBNET_PREFIX}.{n}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise RuntimeError(f"no free /24 in {SUBNET_PREFIX}.0.0/16 for the test network")


@dataclass
class Host:
    """One namespace: `address` is its only address; `port` is its veth end on the bridge (root namespace)."""

    role: str
    netns: str
    address: str
    port: str

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace (`ip netns exec` keeps the pid: signals reach the process)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class Network:
    """A bridge and the hosts on it; `destroy()` removes everything this object made, whatever state it is in."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: ipaddress.IPv4Network | None = None
    _made_bridge: bool = False

    @property
    def bridge(self) -> str:
        return f"llbr{self.run_id}"

    @property
    def bridge_mac(self) -> str:
        """A locally administered address of our own for the bridge, fixed for the whole run."""
        return "02:6c:76:" + ":".join(self.run_id[k : k + 2] for k in range(0, 6, 2))

    @property
    def gateway(self) -> str:
        """The test process's own address on the bridge."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def create(self) -> Network:
        """The bridge, up, with the first address of a free /24."""
        with open(_LOCK_PATH, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _free_subnet()
            ip("link", "add", self.bridge, "type", "bridge")
            self._made_bridge = True
            # a bridge takes the lowest address of its ports unless given one: hosts pin this one (see cut)
            ip("link", "set", self.bridge, "address", self.bridge_mac)
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, role: str) -> Host:
        """A new namespace joined to the bridge by a veth pair, with the next free address of the subnet."""
        assert self.subnet is not None, "create() first"
        index = len(self.hosts)
        address = str(self.subnet.network_address + FIRST_HOST_OCTET + index)
        host = Host(
            role=role, netns=f"llava-{self.run_id}-{role}", address=address, port=f"llv{self.run_id}{index:02d}"
        )
        self.hosts[role] = host
        ip("netns", "add", host.netns)
        ip("link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("link", "set", host.port, "master", self.bridge)
        ip("link", "set", host.port, "up")
        ip("-n", host.netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        self._pin_neighbours(host)
        return host

    def cut(self, host: Host) -> None:
        """Partition `host` from every other host (and from the test process): its bridge port goes down.

        Neighbour (ARP) entries are pinned when hosts join, so no kernel learns of the cut from failed address
        resolution and answers `No route to host`: packets vanish, as in a partition between hosts on routed
        networks, and TCP retransmits what was in flight once the cut heals."""
        ip("link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        ip("link", "set", host.port, "up")

    def heal_all(self) -> None:
        for host in self.hosts.values():
            ip("link", "set", host.port, "up", check=False)

    def _pin_neighbours(self, host: Host) -> None:
        """Permanent neighbour entries between `host` and every other host and the bridge, both ways."""
        mac = _mac("-n", host.netns, "link", "show", "eth0")
        for other in self.hosts.values():
            if other is not host:
                other_mac = _mac("-n", other.netns, "link", "show", "eth0")
                ip("-n", host.netns, "neigh", "replace", other.address, "lladdr", other_mac, "dev", "eth0", "nud",
                   "permanent")  # fmt: skip
                ip("-n", other.netns, "neigh", "replace", host.address, "lladdr", mac, "dev", "eth0", "nud",
                   "permanent")  # fmt: skip
        ip("-n", host.netns, "neigh", "replace", self.gateway, "lladdr", self.bridge_mac, "dev", "eth0", "nud",
           "permanent")  # fmt: skip
        ip("neigh", "replace", host.address, "lladdr", mac, "dev", self.bridge, "nud", "permanent")

    def destroy(self) -> list[str]:
        """Delete every namespace, veth pair and the bridge; returns what could not be deleted (empty: all gone).
        Stop the processes inside first: a namespace with processes in it outlives its name."""
        problems = []
        for host in self.hosts.values():
            for args in (("link", "del", host.port), ("netns", "del", host.netns)):
                done = ip(*args, check=False)
                if done.returncode != 0 and not _already_gone(done.stderr):
                    problems.append(f"`ip {' '.join(args)}`: {done.stderr.strip()}")
        if self._made_bridge:
            done = ip("link", "del", self.bridge, check=False)
            if done.returncode != 0 and not _already_gone(done.stderr):
                problems.append(f"`ip link del {self.bridge}`: {done.stderr.strip()}")
        listed = ip("netns", "list", check=False).stdout
        problems += [f"namespace {h.netns} still listed" for h in self.hosts.values() if h.netns in listed]
        if ip("link", "show", self.bridge, check=False).returncode == 0:
            problems.append(f"bridge {self.bridge} still exists")
        return problems


def _mac(*show: str) -> str:
    """The link-layer address of the one link `ip -j SHOW` lists."""
    return str(json.loads(ip("-j", *show).stdout)[0]["address"])


def _already_gone(stderr: str) -> bool:
    return "Cannot find device" in stderr or "No such file" in stderr or "does not exist" in stderr
