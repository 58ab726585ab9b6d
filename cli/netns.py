"""Hosts of their own on this machine for tests and benchmarks of network faults: one Linux network namespace per
process, each with one address on a private bridge, as if every process ran on a separate host behind one switch.

The bridge lives in the root namespace with the first address of a /24 that no address or route of this machine
covers (10.213.N.0/24, the first free N from 7), so the process that made it reaches every host directly and traffic
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
FIRST_HOST_OCTET = 10  # .1 is the bridge (the process that made it), hosts from .10
_LOCK_PATH = Path(tempfile.gettempdir()) / "llava-netns.lock"  # one subnet picked at a time across runs


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; raises RuntimeError with ip's own message when it fails and `check` is set."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def precondition_reason(platform: str, euid: int, ip_path: str | None) -> str | None:
    """Why namespaces cannot be made on `platform` by user `euid` with `ip` at `ip_path`, before trying; None: try."""
    if not platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {platform})"
    if euid != 0:
        return f"creating network namespaces needs root (`ip netns add`); this process runs as uid {euid}"
    if ip_path is None:
        return "iproute2's `ip` command is not installed"
    return None


def unavailable_reason() -> str | None:
    """Why network namespaces, veth pairs and a bridge cannot be made here; None when they can (one is made and
    removed to find out)."""
    reason = precondition_reason(sys.platform, os.geteuid(), shutil.which("ip"))
    if reason is not None:
        return reason
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


def free_subnet(used: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /24 of SUBNET_PREFIX.N.0 (N from FIRST_SUBNET) that overlaps none of `used`."""
    for n in range(FIRST_SUBNET, 255):
        candidate = ipaddress.ip_network(f"{SUBNET_PREFIX}.{n}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise RuntimeError(f"no free /24 in {SUBNET_PREFIX}.{FIRST_SUBNET}-254.0 for the namespace network")


def host_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    """The address of the `index`-th host (from 0) on `subnet`; the bridge has the first one."""
    if not 0 <= index < subnet.num_addresses - FIRST_HOST_OCTET - 1:
        raise ValueError(f"host index {index} is out of range for {subnet} (0 to "
                         f"{subnet.num_addresses - FIRST_HOST_OCTET - 2})")  # fmt: skip
    return str(subnet.network_address + FIRST_HOST_OCTET + index)


def host_commands(bridge: str, netns: str, port: str, address: str, prefixlen: int) -> list[tuple[str, ...]]:
    """The `ip` commands that make namespace `netns` and join it to `bridge` through veth `port`, at `address`."""
    return [
        ("netns", "add", netns),
        ("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns),
        ("link", "set", port, "master", bridge),
        ("link", "set", port, "up"),
        ("-n", netns, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0"),
        ("-n", netns, "link", "set", "eth0", "up"),
        ("-n", netns, "link", "set", "lo", "up"),
    ]


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
        """The address on the bridge of the process that made it."""
        if self.subnet is None:
            raise RuntimeError("the network has no subnet before create()")
        return str(self.subnet.network_address + 1)

    def create(self) -> Network:
        """The bridge, up, with the first address of a free /24."""
        with open(_LOCK_PATH, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = free_subnet(_networks_in_use())
            ip("link", "add", self.bridge, "type", "bridge")
            self._made_bridge = True
            # a bridge takes the lowest address of its ports unless given one: hosts pin this one (see cut)
            ip("link", "set", self.bridge, "address", self.bridge_mac)
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, role: str) -> Host:
        """A new namespace joined to the bridge by a veth pair, with the next free address of the subnet."""
        if self.subnet is None:
            raise RuntimeError("add_host() needs the bridge: call create() first")
        if role in self.hosts:
            raise ValueError(f"host role {role!r} is already on this network")
        index = len(self.hosts)
        address = host_address(self.subnet, index)
        host = Host(
            role=role, netns=f"llava-{self.run_id}-{role}", address=address, port=f"llv{self.run_id}{index:02d}"
        )
        self.hosts[role] = host
        for command in host_commands(self.bridge, host.netns, host.port, address, self.subnet.prefixlen):
            ip(*command)
        self._pin_neighbours(host)
        return host

    def cut(self, host: Host) -> None:
        """Partition `host` from every other host (and from the process that made the network): its port goes down.

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
