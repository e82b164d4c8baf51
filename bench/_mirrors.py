"""The two node-local mirrors the Spegel bench compares, behind one small interface.

Each puts its daemon on every node of a harness Cluster, writes containerd's hosts.toml the way
its own installer does (`shoal configure`, `spegel configuration`), waits until it is ready,
and tells when a node's mirror can find given content on its peers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tests.harness.cluster import Cluster, Node, wait_until
from tests.harness.images import Image
from tests.harness.spegel import SpegelDaemon, configure_hosts


class Mirror(Protocol):
    name: str

    def configures_hosts(self) -> bool:
        """Whether Cluster.add_node should write shoal's hosts.toml (shoal's own installer)."""
        ...

    def start(self, cluster: Cluster) -> None: ...

    def wait_found(self, node: Node, ref: str, image: Image) -> None:
        """Until `node`'s mirror would find the image's tag (`ref`), manifest, config and
        layers on a peer."""
        ...

    def pid(self, node: Node) -> int: ...


class Shoal:
    name = "shoal"

    def configures_hosts(self) -> bool:
        return True

    def start(self, cluster: Cluster) -> None:
        for node in cluster.nodes:
            cluster.start_shoal(node)
        cluster.wait_connected()

    def wait_found(self, node: Node, ref: str, image: Image) -> None:
        for key in [*image.blobs, ref]:
            wait_until(lambda k=key: bool(node.providers(k)), 120, f"{node.ns.short_name}: {key}")

    def pid(self, node: Node) -> int:
        assert node.shoal is not None and node.shoal.proc is not None
        return node.shoal.proc.pid


class Spegel:
    name = "Spegel"

    def __init__(self, binary: Path, extra_args: list[str] | None = None) -> None:
        self.binary = binary
        self.extra_args = list(extra_args or [])
        self.daemons: dict[str, SpegelDaemon] = {}

    def configures_hosts(self) -> bool:
        return False

    def start(self, cluster: Cluster) -> None:
        registry = f"http://{cluster.registry.host}"
        self.daemons = {}
        for node in cluster.nodes:
            configure_hosts(self.binary, node.containerd.hosts_dir, registry,
                            f"http://{node.ns.ip}:5000", netns=node.ns.name)  # fmt: skip
            self.daemons[node.ns.short_name] = SpegelDaemon(
                self.binary, node.containerd, node.ns.ip, mirrored_registries=[registry],
                extra_args=self.extra_args,
            )  # fmt: skip
        peers = [d.multiaddr for d in self.daemons.values()]
        for daemon in self.daemons.values():
            daemon.start(peers)
        for daemon in self.daemons.values():
            wait_until(daemon.ready, 120, f"Spegel on {daemon.node.name} ready")

    def wait_found(self, node: Node, ref: str, image: Image) -> None:
        """HEADs through the node's Spegel: it never goes upstream, so 200 means a peer has it."""
        daemon = self.daemons[node.ns.short_name]
        registry, _, rest = ref.partition("/")
        repo, _, tag = rest.rpartition(":")
        paths = [f"/v2/{repo}/manifests/{r}?ns={registry}" for r in (tag, image.digest)]
        blobs = (image.config, *image.layers)
        paths += [f"/v2/{repo}/blobs/{b.digest}?ns={registry}" for b in blobs]
        for path in paths:
            found: Callable[[], bool] = lambda p=path: daemon.request(p, "HEAD")[0] == 200  # noqa: E731
            wait_until(found, 120, f"{node.ns.short_name}: {path}")

    def pid(self, node: Node) -> int:
        proc = self.daemons[node.ns.short_name].proc
        assert proc is not None
        return proc.pid


def settle(seconds: float = 1.0) -> None:
    """A short pause after start-up so that neither mirror's start-up work lands in a run."""
    time.sleep(seconds)
