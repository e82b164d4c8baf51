"""A simulated cluster: per node a network namespace with its own containerd and shoal.

Every shoal listens on the same ports on all of its node's addresses (as in a DaemonSet with
hostNetwork), finds the others by static bootstrap, and shares one cluster key with them. Its
node's hosts.toml (written by `shoal configure`) sends pulls of the test registry to it over
loopback, as the chart does: only requests from the node itself count as its containerd's.
"""

from __future__ import annotations

import json
import secrets
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
MIRROR = f"http://127.0.0.1:{PORT}"  # what every node's containerd uses


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls `check`; returns how long it took, or fails the test with `what`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def request_from(
    ns: Namespace, url: str, method: str = "GET", headers: dict | None = None
) -> tuple[int, dict, bytes]:
    """An HTTP request made from inside `ns` (redirects are not followed)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    def call() -> tuple[int, dict, bytes]:
        req = urllib.request.Request(url, method=method, headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    return ns.run(call)


@dataclass
class Node:
    ns: Namespace
    containerd: ContainerdNode
    shoal: ShoalDaemon | None = None
    key_file: Path | None = None  # its cluster's key, for requests posing as a peer

    def request(
        self, path: str, port: int = PORT, method: str = "GET", headers: dict | None = None
    ) -> tuple[int, dict, bytes]:
        """An HTTP request from inside this node's namespace to its own shoal, over loopback
        (as its containerd asks)."""
        return request_from(self.ns, f"http://127.0.0.1:{port}{path}", method, headers)

    def peer_request(
        self, path: str, method: str = "GET", headers: dict | None = None
    ) -> tuple[int, dict, bytes]:
        """A request to this node's shoal signed as another member's would be (the peer
        protocol's marks and signature), over loopback."""
        from shoal.tenancy.keys import ClusterKey
        from shoal.tenancy.signer import PeerSigner

        assert self.key_file is not None, "the node belongs to no cluster"
        signer = PeerSigner(ClusterKey.from_file(self.key_file), lambda: "a-member")
        target, _, query = path.partition("?")
        ns = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("ns")
        marks = signer.headers(method, target, ns, False)
        return self.request(path, method=method, headers={**(headers or {}), **marks})

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

    @property
    def key_file(self) -> Path:
        """The cluster key every shoal of this cluster is given (made on first use)."""
        path = self.base / "cluster.key"
        if not path.exists():
            self.base.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path

    def add_node(self, name: str, *, configure: bool = True) -> Node:
        """A node; with `configure`, its hosts.toml sends pulls of the registry to its shoal."""
        ns = self.net.add(name)
        cd = ContainerdNode(name, self.base / name, netns=ns.name).start()
        reg = self.registry.host
        if configure:
            subprocess.run(
                [sys.executable, "-m", "shoal.cli", "configure", "--hosts-dir",
                 str(cd.hosts_dir), "--mirror", MIRROR, "--registry", f"{reg}=http://{reg}"],
                check=True,
            )  # fmt: skip
        node = Node(ns, cd, key_file=self.key_file)
        self.nodes.append(node)
        return node

    def start_shoal(self, node: Node, *extra: str) -> ShoalDaemon:
        others = [n.ns.ip for n in self.nodes if n is not node]
        peers = ",".join(f"/ip4/{ip}/tcp/{P2P}" for ip in others)
        node.shoal = ShoalDaemon(
            node.containerd, host=node.ns.ip, bind="0.0.0.0", port=PORT, metrics_port=METRICS,
            p2p_port=P2P,
            extra_args=["--bootstrap", "static", "--bootstrap-peers", peers,
                        "--cluster-key-file", str(self.key_file), *self.shoal_args, *extra],
        ).start()  # fmt: skip
        return node.shoal

    def wait_settled(self, timeout: float = 60) -> None:
        """Every shoal's routing table has settled: lookups answer from the node's own store,
        as on a cluster that has run for a while (shoal.routing.options.lookup_settled_after)."""
        self.wait_connected(timeout)
        if len(self.nodes) < 2:
            return  # alone: nothing to settle
        for node in self.nodes:
            wait_until(
                lambda n=node: n.metric("shoal_routing_table_settled") >= 1, timeout,
                f"{node.ns.short_name}'s routing table settles",
            )  # fmt: skip

    def wait_connected(self, timeout: float = 60) -> None:
        """Every shoal knows every other one (their routing tables are complete)."""
        want = len(self.nodes) - 1
        for node in self.nodes:
            wait_until(
                lambda n=node: n.metric("shoal_peers") >= want, timeout,
                f"{node.ns.short_name} sees {want} peers",
            )  # fmt: skip
