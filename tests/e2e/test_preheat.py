"""Preheat (issue 16): with the registry behind a 200 Mbit/s link, `shoal preheat --replicas 2`
has two nodes fetch and keep the image (the registry sends it about once); then the registry
stops, and all three nodes pull the image by tag: from the nodes that keep it, nothing from
upstream."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import images
from tests.harness.cluster import METRICS, Cluster, Node, wait_until
from tests.harness.netns import Network
from tests.harness.procs import stop_all
from tests.harness.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.netns]


@dataclass
class World:
    cluster: Cluster
    registry: Registry
    image: images.Image
    ref: str

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("preheat")
    net = Network("preheat").create()
    try:
        reg_ns = net.add("reg")
        registry = Registry(base / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
        image = images.large_image(48, layers=3, seed=31, name="preheat")
        ref = images.push(image, registry, "rollout/app", "v1")
        reg_ns.limit("200mbit")
        listed = ["--mirror-registries", registry.host, "--upstream-insecure", registry.host]
        cluster = Cluster(net, base, registry, shoal_args=listed)
        for i in range(3):
            cluster.add_node(f"h{i + 1}")
        for node in cluster.nodes:
            cluster.start_shoal(node)
        cluster.wait_connected()
        yield World(cluster, registry, image, ref)
    finally:
        stop_all()
        net.destroy()


def status(node: Node) -> dict:
    url = f"http://{node.ns.ip}:{METRICS}/status.json"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def upstream_bytes(node: Node) -> float:
    return node.metric("shoal_pull_bytes_total", source="upstream")


def test_preheated_image_is_pulled_by_every_node_with_the_registry_stopped(world: World) -> None:
    n1 = world.nodes[0]
    mark = world.registry.mark()
    proc = n1.ns.exec(
        [sys.executable, "-m", "shoal.cli", "preheat", world.ref, "--replicas", "2",
         "--address", f"{n1.ns.ip}:{METRICS}", "--timeout", "300"],
        check=False, timeout=400,
    )  # fmt: skip
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copies = proc.stdout.split("copies:\n", 1)[1].splitlines()
    assert len(copies) == 2 and all(line.split()[2] == "kept" for line in copies), copies
    holders = [n for n in world.nodes if any(line.split()[0].startswith(n.ns.ip + ":")
                                             for line in copies)]  # fmt: skip
    assert len(holders) == 2
    for node in holders:
        for digest in world.image.blobs:
            assert node.containerd.has_blob(digest), (node.ns.short_name, digest)
        assert node.containerd.images() == {}  # kept as content only: the kubelet names it
    # The cluster fetched the image's blobs from the registry once (the designated holder).
    sent = world.registry.bytes_sent(since=mark, blobs_only=True)
    print(f"registry sent {sent / world.image.total_size:.2f}x the image's bytes")
    assert sent <= 1.1 * world.image.total_size
    tag_key = world.ref
    other = next(n for n in world.nodes if n not in holders)
    wait_until(lambda: len(other.providers(tag_key)) == 2, 30, "both holders advertise the tag")

    world.registry.stop()
    before = {n.ns.short_name: upstream_bytes(n) for n in world.nodes}
    peer_before = other.metric("shoal_pull_bytes_total", source="peer")
    try:
        # Node 1 resolved the tag upstream when it started the preheat (and would remember the
        # answer): the others pull first, with nothing but the holders to tell them the tag.
        for node in [*world.nodes[1:], n1]:
            node.containerd.pull(world.ref)
            assert node.containerd.images()[world.ref] == world.image.digest
            for digest, blob in world.image.blobs.items():
                assert node.containerd.read_blob(digest) == blob.data
        after = {n.ns.short_name: upstream_bytes(n) for n in world.nodes}
        assert after == before, (before, after)  # not a byte from upstream after the stop
        got = other.metric("shoal_pull_bytes_total", source="peer") - peer_before
        assert got >= sum(layer.size for layer in world.image.layers)  # all from the holders
        for node in holders:  # containerd found every blob present: it asked only for the tag
            pulls = status(node)["pulls"]
            asked = [p for p in pulls if p["asker"] == "containerd" and p["kind"] == "blob"]
            assert asked == [], asked
        for node in holders:
            wait_until(
                lambda n=node: [j["state"] for j in status(n)["preheats"]] == ["pulled"], 30,
                f"{node.ns.short_name} sees its kubelet pulled the preheated image",
            )  # fmt: skip
            leases = node.containerd.ctr("leases", "ls", "-q").stdout.split()
            assert not [lease for lease in leases if lease.startswith("shoal-preheat-")]
    finally:
        world.registry.start()
