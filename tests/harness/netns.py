"""Network namespaces joined by a bridge: simulated nodes with their own IPs and links.

Layout: one Linux bridge in the root namespace carries the bridge address (`.1`, so test code
and components in the root namespace can reach the nodes) and one veth per `Namespace`, whose
inner end is `eth0` with the node's address. Namespaces get no default route, so nothing can
leave the private subnet.

Names start with `shoal-`; netns names carry the creating pid and links carry it in their
alias, so `cleanup_leftovers()` can remove what a crashed run left without touching the
resources of a concurrent run.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from .procs import HarnessError, pid_alive, stop_all

__all__ = [
    "Namespace",
    "Network",
    "cleanup_leftovers",
    "run_in_netns",
    "socket_in_netns",
]

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")
_LOCK_PATH = Path("/tmp/shoal-netns.lock")
_SUBNET_PREFIX = "10.213"


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Call `fn` on a helper thread that has joined network namespace `netns`.

    setns(2) changes only the calling thread, and sockets stay in the namespace they were
    created in, so this is also how in-process servers and clients live inside a namespace.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(_NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def socket_in_netns(
    netns: str | None, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket belonging to `netns` (root namespace when None), usable from any thread."""
    if netns is None:
        return socket.socket(family, type)
    return run_in_netns(netns, lambda: socket.socket(family, type))


def _rate_bits(rate: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)", rate.strip().lower())
    if not m:
        raise ValueError(f"rate like '200mbit' expected, got {rate!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return int(value * (8 if m.group(3) == "bps" else 1))


class Namespace:
    """A network namespace with `lo` up and `eth0` (a veth into the network's bridge)."""

    def __init__(self, network: Network, name: str, ip: str, index: int) -> None:
        self.network = network
        self.short_name = name
        self.name = f"{network.prefix}-{name}"  # the `ip netns` name
        self.ip = ip
        self.veth_host = f"{network.link_prefix}-v{index}"
        self.veth_ns = "eth0"
        self._created = False

    def create(self) -> Namespace:
        net = self.network
        tmp_peer = f"{net.link_prefix}-p{self.veth_host.rsplit('-v', 1)[1]}"
        _run(["ip", "netns", "add", self.name])
        self._created = True
        _run(["ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", tmp_peer])
        _run(["ip", "link", "set", self.veth_host, "alias", net.alias])
        _run(["ip", "link", "set", tmp_peer, "netns", self.name])
        self.exec(["ip", "link", "set", tmp_peer, "name", self.veth_ns])
        self.exec(["ip", "addr", "add", f"{self.ip}/{net.subnet.prefixlen}", "dev", self.veth_ns])
        self.exec(["ip", "link", "set", "lo", "up"])
        self.exec(["ip", "link", "set", self.veth_ns, "up"])
        _run(["ip", "link", "set", self.veth_host, "master", net.bridge])
        _run(["ip", "link", "set", self.veth_host, "up"])
        return self

    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def exec(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.prefix(), *cmd], capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise HarnessError(
                f"[{self.name}] {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def run(self, fn: Callable[[], T]) -> T:
        """Call `fn` with this namespace as the thread's network namespace."""
        return run_in_netns(self.name, fn)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        return socket_in_netns(self.name, family, type)

    def limit(self, rate: str = "200mbit", *, direction: str = "both") -> None:
        """Shape this node's link with a token bucket (tbf shapes egress only, so each
        direction is shaped on the sending end: "in" = host veth, "out" = eth0)."""
        if direction not in ("both", "in", "out"):
            raise ValueError("direction must be 'both', 'in' or 'out'")
        bits = _rate_bits(rate)
        # The bucket must hold at least one timer tick of traffic and a full GSO packet.
        burst = max(64 * 1024, bits // 8 // 100)
        args = ["root", "tbf", "rate", str(bits), "burst", str(burst), "latency", "100ms"]
        if direction in ("both", "in"):
            _run(["tc", "qdisc", "replace", "dev", self.veth_host, *args])
        if direction in ("both", "out"):
            self.exec(["tc", "qdisc", "replace", "dev", self.veth_ns, *args])

    def cut(self) -> None:
        """The link goes silent, as a machine that crashed: what is sent to the namespace is
        dropped, with no reset and no FIN (its host-side veth goes down)."""
        _run(["ip", "link", "set", self.veth_host, "down"])

    def unlimit(self) -> None:
        _run(["tc", "qdisc", "del", "dev", self.veth_host, "root"], check=False)
        self.exec(["tc", "qdisc", "del", "dev", self.veth_ns, "root"], check=False)

    def sent_bytes(self) -> int:
        """Bytes this namespace has sent over its link so far (every packet: bodies, headers,
        ACKs): what the host end of its veth received, read without entering the namespace."""
        return int(Path(f"/sys/class/net/{self.veth_host}/statistics/rx_bytes").read_text())

    def received_bytes(self) -> int:
        """Bytes this namespace has received over its link so far (every packet)."""
        return int(Path(f"/sys/class/net/{self.veth_host}/statistics/tx_bytes").read_text())

    def pids(self) -> list[int]:
        out = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in out.split()]

    def destroy(self) -> None:
        """Stop the harness processes running inside, then delete the namespace (its veth
        pair goes with it; a process left inside would keep it alive invisibly)."""
        if not self._created:
            return
        stop_all(netns=[self.name])
        _run(["ip", "link", "del", self.veth_host], check=False)
        _run(["ip", "netns", "del", self.name], check=False)
        self._created = False

    def __repr__(self) -> str:
        return f"<Namespace {self.name} {self.ip}>"


class Network:
    """A private /24 (auto-picked under 10.213.0.0/16 unless given) with a root-side bridge.

    Use as a context manager or call `create()`/`destroy()`.
    """

    def __init__(self, name: str = "net", subnet: str | None = None) -> None:
        self.name = name
        self.tag = secrets.token_hex(2)
        self.prefix = f"shoal-{os.getpid()}-{self.tag}"  # netns names: no length limit
        self.link_prefix = f"shoal-{self.tag}"  # interface names: at most 15 characters
        self.bridge = f"{self.link_prefix}-br"
        self.alias = f"shoal pid={os.getpid()} net={name}"
        self._requested = ipaddress.IPv4Network(subnet) if subnet else None
        self.subnet: ipaddress.IPv4Network = self._requested or ipaddress.IPv4Network(
            f"{_SUBNET_PREFIX}.0.0/24"
        )
        self.namespaces: dict[str, Namespace] = {}
        self._next_host = 2
        self._next_index = 1  # veth names: never reused while the network lives
        self._free_ips: list[str] = []  # of removed namespaces
        self._created = False

    @property
    def host_ip(self) -> str:
        """The bridge's address in the root namespace (where root-side components listen)."""
        return str(self.subnet.network_address + 1)

    def create(self) -> Network:
        with open(_LOCK_PATH, "a") as lock:
            # Concurrent runs each pick a subnet nobody holds; the lock spans pick + assign.
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._requested is None:
                    self.subnet = _pick_subnet()
                elif any(self.subnet.overlaps(u) for u in _used_subnets()):
                    raise HarnessError(f"subnet {self.subnet} is already in use on this host")
                _run(["ip", "link", "add", self.bridge, "type", "bridge"])
                self._created = True
                _run(["ip", "link", "set", self.bridge, "alias", self.alias])
                _run(
                    [
                        "ip",
                        "addr",
                        "add",
                        f"{self.host_ip}/{self.subnet.prefixlen}",
                        "dev",
                        self.bridge,
                    ]
                )
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        # Keep host iptables (br_netfilter) out of bridged test traffic.
        _run(
            ["ip", "link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0"],
            check=False,
        )
        _run(["ip", "link", "set", self.bridge, "up"])
        return self

    def add(self, name: str, ip: str | None = None) -> Namespace:
        """Create namespace `name` with address `ip` (next free one by default)."""
        if not self._created:
            raise HarnessError("Network.create() first")
        if name in self.namespaces:
            raise HarnessError(f"namespace {name} exists")
        if ip is None and self._free_ips:
            ip = self._free_ips.pop(0)
        elif ip is None:
            ip = str(self.subnet.network_address + self._next_host)
            self._next_host += 1
        ns = Namespace(self, name, ip, self._next_index)
        self._next_index += 1
        self.namespaces[name] = ns
        try:
            ns.create()
        except BaseException:
            ns.destroy()
            raise
        return ns

    def remove(self, name: str) -> None:
        """Destroy namespace `name`; its name and address can be used again."""
        ns = self.namespaces.pop(name)
        ns.destroy()
        self._free_ips.append(ns.ip)

    def __getitem__(self, name: str) -> Namespace:
        return self.namespaces[name]

    def destroy(self) -> None:
        for ns in list(self.namespaces.values()):
            ns.destroy()
        self.namespaces.clear()
        if self._created:
            _run(["ip", "link", "del", self.bridge], check=False)
            self._created = False

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"<Network {self.bridge} {self.subnet}>"


def _used_subnets() -> list[ipaddress.IPv4Network]:
    used = []
    for line in _run(["ip", "-4", "-o", "addr", "show"]).splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            used.append(ipaddress.IPv4Interface(m.group(1)).network)
    return used


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _used_subnets()
    free = [
        i
        for i in range(1, 255)
        if not any(ipaddress.IPv4Network(f"{_SUBNET_PREFIX}.{i}.0/24").overlaps(u) for u in used)
    ]
    if not free:
        raise HarnessError(f"no free {_SUBNET_PREFIX}.x.0/24 subnet")
    third = free[secrets.randbelow(len(free))]
    return ipaddress.IPv4Network(f"{_SUBNET_PREFIX}.{third}.0/24")


def cleanup_leftovers() -> list[str]:
    """Remove namespaces and links that runs no longer alive left behind; returns their names.

    Processes still running inside such a namespace were started by that dead run's harness
    (its PDEATHSIG normally kills them already); they are killed by pid before the delete.
    """
    removed: list[str] = []
    names = _run(["ip", "netns", "list"], check=False).split("\n")
    for line in names:
        m = re.match(r"(shoal-(\d+)-\S+)", line.strip())
        if not m or pid_alive(int(m.group(2))):
            continue
        netns = m.group(1)
        for pid in _run(["ip", "netns", "pids", netns], check=False).split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)
        time.sleep(0.05)
        _run(["ip", "netns", "del", netns], check=False)
        removed.append(netns)
    for link in Path("/sys/class/net").iterdir():
        if not link.name.startswith("shoal-"):
            continue
        try:
            alias = (link / "ifalias").read_text().strip()
        except OSError:
            continue
        m = re.match(r"shoal pid=(\d+)", alias)
        if m and not pid_alive(int(m.group(1))):
            _run(["ip", "link", "del", link.name], check=False)
            removed.append(link.name)
    return removed
