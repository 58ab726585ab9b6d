"""The namespace network that partition tests and benchmarks put every process on a host of its own with: its
address plan and commands (no root needed), and one real network with a cut and a heal where namespaces can be
made (skipped, with the reason, elsewhere)."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import pytest

from cli.netns import (
    FIRST_SUBNET,
    Host,
    Network,
    free_subnet,
    host_address,
    host_commands,
    ip,
    precondition_reason,
    unavailable_reason,
)
from cli.processes import Proc, wait_until

SUBNET = ipaddress.ip_network("10.213.9.0/24")
LISTEN_PORT = 10007


def test_the_first_subnet_no_address_or_route_covers_is_taken() -> None:
    assert free_subnet([]) == ipaddress.ip_network(f"10.213.{FIRST_SUBNET}.0/24")
    used = [ipaddress.ip_network("10.213.7.0/24"), ipaddress.ip_network("10.213.8.128/25")]
    assert free_subnet(used) == ipaddress.ip_network("10.213.9.0/24")


def test_no_free_subnet_is_an_error_naming_the_range() -> None:
    with pytest.raises(RuntimeError, match=r"no free /24 in 10\.213\.7-254\.0"):
        free_subnet([ipaddress.ip_network("10.0.0.0/8")])


def test_hosts_get_consecutive_addresses_after_the_bridge() -> None:
    assert [host_address(SUBNET, k) for k in (0, 1, 2)] == ["10.213.9.10", "10.213.9.11", "10.213.9.12"]
    assert host_address(SUBNET, 244) == "10.213.9.254"
    with pytest.raises(ValueError, match="host index 245 is out of range for 10.213.9.0/24 \\(0 to 244\\)"):
        host_address(SUBNET, 245)
    with pytest.raises(ValueError, match="host index -1"):
        host_address(SUBNET, -1)


def test_a_host_is_a_namespace_joined_to_the_bridge_at_its_address() -> None:
    commands = host_commands("llbrabc", "llava-abc-w1", "llvabc00", "10.213.9.10", 24)
    assert commands[0] == ("netns", "add", "llava-abc-w1")
    assert ("link", "add", "llvabc00", "type", "veth", "peer", "name", "eth0", "netns", "llava-abc-w1") in commands
    assert ("link", "set", "llvabc00", "master", "llbrabc") in commands
    assert ("-n", "llava-abc-w1", "addr", "add", "10.213.9.10/24", "dev", "eth0") in commands
    host = Host(role="w1", netns="llava-abc-w1", address="10.213.9.10", port="llvabc00")
    assert host.argv(["redis-server", "--port", "1"]) == ["ip", "netns", "exec", "llava-abc-w1", "redis-server",
                                                          "--port", "1"]  # fmt: skip


def test_the_skip_reason_says_what_is_missing() -> None:
    assert "Linux only (this is darwin)" in precondition_reason("darwin", 0, "/usr/sbin/ip")
    assert "needs root" in precondition_reason("linux", 1000, "/usr/sbin/ip")
    assert "uid 1000" in precondition_reason("linux", 1000, "/usr/sbin/ip")
    assert "`ip` command is not installed" in precondition_reason("linux", 0, None)
    assert precondition_reason("linux", 0, "/usr/sbin/ip") is None


def test_hosts_need_the_bridge_first() -> None:
    with pytest.raises(RuntimeError, match="call create\\(\\) first"):
        Network().add_host("w1")


def _answers(address: str) -> bool:
    with socket.create_connection((address, LISTEN_PORT), timeout=2) as conn:
        return conn.recv(2) == b"hi"


def test_a_host_is_reachable_until_cut_and_again_once_healed(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    net = Network().create()
    proc = None
    try:
        host = net.add_host("listener")
        net.add_host("other")
        listen = (f"import socket\ns = socket.create_server(({host.address!r}, {LISTEN_PORT}))\n"
                  "while True:\n    c, _ = s.accept()\n    c.sendall(b'hi')\n    c.close()\n")  # fmt: skip
        proc = Proc("listener", host.argv([sys.executable, "-c", listen]), {}, tmp_path)
        wait_until(lambda: _answers(host.address), 30, "the listener in its namespace", [proc])
        net.cut(host)
        with pytest.raises(OSError):
            _answers(host.address)
        net.heal(host)
        wait_until(lambda: _answers(host.address), 30, "the listener after the heal", [proc])
    finally:
        if proc is not None:
            proc.stop(timeout_s=10)
        problems = net.destroy()
    assert problems == []
    listed = ip("netns", "list").stdout
    assert not any(h.netns in listed for h in net.hosts.values())
