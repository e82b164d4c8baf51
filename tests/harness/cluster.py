"""A simulated cluster: per node a network namespace with its own containerd and shoal.

Every shoal listens on the same ports at its node's address (as in a DaemonSet), finds the
others by static bootstrap, and its node's hosts.toml (written by `shoal configure`) sends
pulls of the test registry to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.containerd import ContainerdNode
from tests.harness.netns import Namespace, Network
from tests.harness.registry import Registry
from tests.harness.shoal import ShoalDaemon

PORT, METRICS, P2P = 30020, 30021, 30022


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls `check`; returns how long it took, or fails the test with `what`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)
    return time.monotonic() - start


@dataclass
class Node:
    ns: Namespace
    containerd: ContainerdNode
    shoal: ShoalDaemon | None = None

    def request(
        self, path: str, port: int = PORT, method: str = "GET", headers: dict | None = None
    ) -> tuple[int, dict, bytes]:
        """An HTTP request from inside this node's namespace to its own shoal."""

        def call() -> tuple[int, dict, bytes]:
            req = urllib.request.Request(
                f"http://{self.ns.ip}:{port}{path}", method=method, headers=headers or {}
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as err:
                return err.code, dict(err.headers), err.read()

        return self.ns.run(call)

    def providers(self, key: str) -> list[str]:
        status, _, body = self.request(f"/debug/providers?key={key}", METRICS)
        if status == 503:  # routing not up yet (a shoal just restarted): it names nobody
            return []
        assert status == 200, body
        return [p["address"].split(":")[0] for p in json.loads(body)["providers"]]

    def peer_id(self) -> str:
        return json.loads(self.request("/_shoal/p2p")[2])["id"]

    def metric(self, name: str, **labels: str) -> float:
        assert self.shoal is not None
        return self.shoal.metric(name, **labels)  # the bridge reaches every node's address


@dataclass
class Cluster:
    net: Network
    base: Path
    registry: Registry
    shoal_args: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)

    def add_node(self, name: str, *, configure: bool = True) -> Node:
        """A node; with `configure`, its hosts.toml sends pulls of the registry to its shoal."""
        ns = self.net.add(name)
        cd = ContainerdNode(name, self.base / name, netns=ns.name).start()
        reg = self.registry.host
        if configure:
            subprocess.run(
                [sys.executable, "-m", "shoal.cli", "configure", "--hosts-dir",
                 str(cd.hosts_dir), "--mirror", f"http://{ns.ip}:{PORT}", "--registry",
                 f"{reg}=http://{reg}"],
                check=True,
            )  # fmt: skip
        node = Node(ns, cd)
        self.nodes.append(node)
        return node

    def start_shoal(self, node: Node, *extra: str) -> ShoalDaemon:
        others = [n.ns.ip for n in self.nodes if n is not node]
        peers = ",".join(f"/ip4/{ip}/tcp/{P2P}" for ip in others)
        node.shoal = ShoalDaemon(
            node.containerd, host=node.ns.ip, port=PORT, metrics_port=METRICS, p2p_port=P2P,
            extra_args=["--bootstrap", "static", "--bootstrap-peers", peers,
                        *self.shoal_args, *extra],
        ).start()  # fmt: skip
        return node.shoal

    def wait_connected(self, timeout: float = 60) -> None:
        """Every shoal knows every other one (their routing tables are complete)."""
        want = len(self.nodes) - 1
        for node in self.nodes:
            wait_until(
                lambda n=node: n.metric("shoal_peers") >= want, timeout,
                f"{node.ns.short_name} sees {want} peers",
            )  # fmt: skip
