"""Peers on real parts (issue 3): each node's containerd and shoal in its own network namespace.

Node 1 pulls from the registry; the registry stops; nodes 2 and 3 pull by tag and by digest
through their own local shoal, which finds node 1 over the libp2p DHT and streams from it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import images
from tests.harness.cluster import PORT, Cluster, Node, wait_until
from tests.harness.netns import Network
from tests.harness.procs import stop_all
from tests.harness.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

RESYNC = 4.0  # seconds; the deletion test waits at most one period (plus event latency)


@dataclass
class World:
    cluster: Cluster
    images: dict[str, images.TestImage]
    refs: dict[str, str]

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    @property
    def registry(self) -> Registry:
        return self.cluster.registry

    def restart(self, node: Node) -> None:
        self.cluster.start_shoal(node)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("peers")
    net = Network("peers").create()
    try:
        registry = Registry(base / "registry", host_ip=net.host_ip).start()
        built: dict[str, images.TestImage] = {
            "small": images.oci_image("p2p-small"),
            "index": images.multiarch_index("p2p-multi"),
            "large": images.large_image(72, layers=1, seed=11, name="p2p-large"),  # one 72 MiB blob
        }
        refs = {k: images.push(img, registry, f"p2p/{k}", "v1") for k, img in built.items()}
        c = Cluster(net, base, registry, shoal_args=["--resync-interval", str(RESYNC)])
        for i in range(3):
            c.add_node(f"n{i + 1}")
        for node in c.nodes:
            c.start_shoal(node)
        yield World(c, built, refs)
    finally:
        stop_all()
        net.destroy()


def test_nodes_pull_entirely_from_peers(cluster: World) -> None:
    n1, n2, n3 = cluster.nodes
    for key in ("small", "index", "large"):
        n1.containerd.pull(cluster.refs[key], via_hosts=False, plain_http=True)
    tag = cluster.refs["small"].replace(f"{cluster.registry.host}/", "").split(":")[0]
    wait_until(
        lambda: n2.request(f"/v2/{tag}/manifests/v1?ns={cluster.registry.host}", method="HEAD")[0]
        == 200,
        30, "node 2's shoal finds node 1's tag through the DHT",
    )  # fmt: skip
    manifest = cluster.images["small"].digest
    wait_until(lambda: n1.ns.ip in n3.providers(manifest), 30,
               "node 3's shoal finds node 1's manifest through the DHT")  # fmt: skip
    cluster.registry.stop()
    try:
        n2.containerd.pull(cluster.refs["small"])
        n2.containerd.pull(cluster.refs["index"])
        by_digest = cluster.refs["small"].rsplit(":", 1)[0] + "@" + cluster.images["small"].digest
        n3.containerd.pull(by_digest)
        n3.containerd.pull(cluster.refs["index"].rsplit(":", 1)[0] + "@"
                           + cluster.images["index"].digest)  # fmt: skip
        for node in (n2, n3):
            for key in ("small", "index"):
                for digest in cluster.images[key].for_platform().blobs:
                    assert node.containerd.read_blob(digest) == n1.containerd.read_blob(digest)
        assert n2.metric("shoal_requests_total", source="peer") >= 5
        assert n3.metric("shoal_requests_total", source="peer") >= 5
        assert n1.metric("shoal_requests_total", source="local") >= 10
    finally:
        cluster.registry.start()


def _serving(node: Node, client_ip: str) -> bool:
    out = node.ns.exec(["ss", "-tn", "state", "established", f"( sport = :{PORT} )"]).stdout
    return client_ip in out


@pytest.mark.parametrize("transfer", ["redirect", "relay"])
def test_serving_peer_killed_mid_blob(cluster: World, transfer: str) -> None:
    n1, n2, n3 = cluster.nodes
    ref = cluster.refs["large"]
    layer = cluster.images["large"].layers[0].digest
    # Node 1 holds it from the first test, unless this test runs alone.
    n1.containerd.pull(ref, via_hosts=False, plain_http=True)
    n2.containerd.pull(ref)  # now node 1 and node 2 both hold the 72 MiB image
    if ref in n3.containerd.images():  # pulled by the other variant
        n3.containerd.remove_image(ref)
    n3.shoal.stop()  # type: ignore[union-attr]
    cluster.cluster.start_shoal(n3, "--peer-transfer", transfer)
    wait_until(lambda: len(n3.providers(layer)) == 2, 30, "both holders advertised")
    cluster.registry.stop()
    n3.ns.limit("200mbit")  # ~3 s for the blob: time to kill the server midway
    result: dict[str, object] = {}
    puller = threading.Thread(target=lambda: result.update(r=n3.containerd.pull(ref, check=False)))
    try:
        puller.start()
        wait_until(lambda: _serving(n1, n3.ns.ip) or _serving(n2, n3.ns.ip), 20, "a peer serves")
        time.sleep(0.7)
        victim = n1 if _serving(n1, n3.ns.ip) else n2
        victim.shoal.kill()
        puller.join(120)
        proc = result["r"]
        assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
        redirects = n3.metric("shoal_requests_total", source="peer", kind="blob", code="307")
        if transfer == "redirect":
            # Node 3's shoal sent its containerd to a peer for the layer (a 307), and again,
            # with Range, after the kill: the resume came back here and went to the survivor.
            assert redirects >= 2, redirects
        else:
            # Node 3's shoal streamed the layer itself and resumed it from the survivor:
            # containerd saw one complete answer.
            assert redirects == 0, redirects
            assert n3.metric("shoal_requests_total", source="peer", kind="blob", code="200") >= 1
        for digest in cluster.images["large"].blobs:
            survivor = n2 if victim is n1 else n1
            assert n3.containerd.read_blob(digest) == survivor.containerd.read_blob(digest)
    finally:
        n3.ns.unlimit()
        cluster.registry.start()
        for node in cluster.nodes:
            if node.shoal is None or node.shoal.proc is None:
                cluster.restart(node)
        if transfer != "redirect":
            n3.shoal.stop()  # type: ignore[union-attr]
            cluster.restart(n3)


def test_deleted_image_is_withdrawn_and_restart_keeps_identity(cluster: World) -> None:
    n1, n2, n3 = cluster.nodes
    image = cluster.images["small"]
    n1.containerd.pull(cluster.refs["small"], via_hosts=False, plain_http=True)
    layer = image.layers[0].digest
    wait_until(lambda: n1.ns.ip in n3.providers(layer), 30, "node 1 advertised")
    n1.containerd.remove_image(cluster.refs["small"])  # synchronous GC removes the content
    took = wait_until(lambda: n1.ns.ip not in n3.providers(layer), RESYNC + 6,
                      "node 1 withdrawn after deletion")  # fmt: skip
    print(f"withdrawn {took:.1f}s after deletion")
    # A restarted shoal keeps its peer ID and advertises again what its node holds.
    before = n2.peer_id()
    n2.shoal.stop()
    cluster.restart(n2)
    wait_until(lambda: n2.peer_id() != "", 20, "node 2's routing is up again")
    assert n2.peer_id() == before
    assert n2.containerd.has_blob(layer)
    wait_until(lambda: n2.ns.ip in n3.providers(layer), 30, "node 2 re-advertised")
