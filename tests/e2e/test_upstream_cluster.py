"""Upstream through shoal on real parts (issue 4): tags, 429, allow-list, Bearer auth, and a
cluster of 8 nodes fetching one image from a bandwidth-limited registry about once.

The registry runs in a network namespace of its own, so its link can be limited with tbf.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.cluster import MIRROR, Cluster, Node, wait_until
from tests.harness.cutproxy import CutProxy
from tests.harness.netns import Namespace, Network
from tests.harness.procs import stop_all
from tests.harness.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.netns]


@dataclass
class World:
    net: Network
    base: Path
    reg_ns: Namespace
    registry: Registry
    silly: Registry
    throttler: CutProxy
    cluster: Cluster

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes


def hosts_args(*hosts: str) -> list[str]:
    listed = ",".join(hosts)
    return ["--mirror-registries", listed, "--upstream-insecure", listed]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("upstream")
    net = Network("upstream").create()
    throttler = None
    try:
        reg_ns = net.add("reg")
        registry = Registry(base / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
        silly = Registry(base / "silly", host_ip=reg_ns.ip, netns=reg_ns.name, auth="silly",
                         name="silly").start()  # fmt: skip
        # Answers 429 to the first blob request, in front of the plain registry.
        throttler = CutProxy(registry.url, host=net.host_ip, cuts=0, throttles=1,
                             retry_after=2).start()  # fmt: skip
        throttled = f"{net.host_ip}:{throttler.port}"
        cluster = Cluster(net, base, registry, shoal_args=[
            *hosts_args(registry.host, silly.host, throttled), "--tag-ttl", "1",
            "--resync-interval", "5"])  # fmt: skip
        for i in range(3):
            cluster.add_node(f"u{i + 1}")
        for node in cluster.nodes:
            cluster.start_shoal(node)
            for host in (silly.host, throttled):
                node.containerd.write_hosts_toml(host, MIRROR, f"http://{host}")
        yield World(net, base, reg_ns, registry, silly, throttler, cluster)
    finally:
        if throttler is not None:
            throttler.stop()
        stop_all()
        net.destroy()


def test_upstream_first_tags_and_offline_fallback(world: World) -> None:
    u1, u2, u3 = world.nodes
    old, new = images.oci_image("tag-old"), images.oci_image("tag-new")
    ref = images.push(old, world.registry, "tags/app", "v1")
    mark = world.registry.mark()
    u1.containerd.pull(ref)  # through shoal: nothing on any node, so shoal fetches upstream
    assert u1.containerd.images()[ref] == old.digest
    # Each blob came from upstream once, through whichever node was designated to fetch it.
    fetched = sum(n.metric("shoal_requests_total", source="upstream", kind="blob")
                  for n in world.nodes)  # fmt: skip
    assert fetched >= 3
    assert world.registry.requests(since=mark)  # shoal, not containerd, talked to it
    wait_until(lambda: u1.ns.ip in u2.providers(f"{world.registry.host}/tags/app:v1"), 30,
               "u1 advertises the tag")  # fmt: skip

    world.registry.stop()
    try:
        u2.containerd.pull(ref)  # registry down: the tag resolves from peers
        assert u2.containerd.images()[ref] == old.digest
    finally:
        world.registry.start()

    images.push(new, world.registry, "tags/app", "v1")  # the tag moves upstream
    time.sleep(1.5)  # past --tag-ttl
    u3.containerd.pull(ref)  # peers still say "old"; upstream-first asks upstream
    assert u3.containerd.images()[ref] == new.digest


def test_rate_limited_upstream_is_waited_for(world: World) -> None:
    u1 = world.nodes[0]
    host = f"{world.net.host_ip}:{world.throttler.port}"
    image = images.oci_image("throttled")
    images.push(image, world.registry, "slow/app", "v1")
    ref = f"{host}/slow/app:v1"
    u1.containerd.pull(ref)
    assert u1.containerd.images()[ref] == image.digest
    seen = world.throttler.seen
    throttled = [s for s in seen if s.status == 429]
    assert len(throttled) == 1
    retried = [s for s in seen if s.path == throttled[0].path and s.status == 200]
    assert retried and retried[0].at - throttled[0].at >= 1.9  # Retry-After: 2 honoured


def test_bearer_token_flow_through_shoal(world: World) -> None:
    u2 = world.nodes[1]
    image = images.oci_image("private-ish")
    ref = images.push(image, world.silly, "auth/app", "v1")
    assert world.silly.token_server is not None
    before = len(world.silly.token_server.requests())
    u2.containerd.pull(ref)
    assert u2.containerd.images()[ref] == image.digest
    assert len(world.silly.token_server.requests()) > before  # shoal fetched a token
    assert sum(n.metric("shoal_requests_total", source="upstream") for n in world.nodes) >= 3


def test_ns_outside_allow_list_makes_no_connection(world: World) -> None:
    u1 = world.nodes[0]
    accepted: list[object] = []
    trap = world.reg_ns.run(lambda: socket.create_server((world.reg_ns.ip, 0)))
    trap.settimeout(0.2)
    port = trap.getsockname()[1]

    def watch() -> None:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                accepted.append(trap.accept())
            except TimeoutError:
                continue

    watcher = threading.Thread(target=watch)
    watcher.start()
    hostile = [f"{world.reg_ns.ip}:{port}", "169.254.169.254", "evil.example.com",
               "localhost:30021", "%5B::1%5D:22"]  # fmt: skip
    for ns in hostile:
        for path in ("/v2/x/manifests/v1", "/v2/x/blobs/sha256:" + "a" * 64):
            status, _, body = u1.request(f"{path}?ns={ns}")
            assert status in (400, 404), (ns, status)
            assert b'"errors"' in body
    watcher.join()
    trap.close()
    assert accepted == []


@pytest.mark.slow
def test_eight_nodes_fetch_an_image_from_upstream_about_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.mktemp("eight")
    net = Network("eight").create()
    try:
        reg_ns = net.add("reg")
        registry = Registry(base / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
        image = images.large_image(128, layers=4, seed=21, name="rollout")
        ref = images.push(image, registry, "rollout/app", "v1")
        reg_ns.limit("200mbit")
        cluster = Cluster(net, base, registry, shoal_args=hosts_args(registry.host))
        for i in range(8):
            cluster.add_node(f"r{i + 1}")
        for node in cluster.nodes:
            cluster.start_shoal(node)
        cluster.wait_connected()
        mark = registry.mark()
        results: dict[str, int] = {}

        def fetch(node: Node) -> None:
            # `content fetch` is a pull without unpacking: the 8 "machines" share 2 cores here,
            # and unpacking is each real machine's own local work.
            hosts = str(node.containerd.hosts_dir)
            proc = node.containerd.ctr("content", "fetch", "--hosts-dir", hosts, ref, check=False)
            results[node.ns.short_name] = proc.returncode

        threads = [threading.Thread(target=fetch, args=(n,)) for n in cluster.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert results == {n.ns.short_name: 0 for n in cluster.nodes}
        for node in cluster.nodes:
            for digest in image.blobs:
                assert node.containerd.has_blob(digest), (node.ns.short_name, digest)
        sent = registry.bytes_sent(since=mark, blobs_only=True)
        print(f"registry sent {sent / image.total_size:.2f}x the image's bytes")
        assert sent <= 1.1 * image.total_size
        # One node fetched the whole image, its layers one after another in manifest order (a
        # record is written when its response completed), so nodes could unpack layer 1 while
        # layer 2 arrived.
        layer_paths = {f"/v2/rollout/app/blobs/{layer.digest}": n
                       for n, layer in enumerate(image.layers)}  # fmt: skip
        gets = [r for r in registry.access_log(mark)
                if r.method == "GET" and r.status == 200 and r.path in layer_paths]  # fmt: skip
        assert len({r.remote.rsplit(":", 1)[0] for r in gets}) == 1, gets
        assert [layer_paths[r.path] for r in gets] == list(range(len(image.layers))), gets
    finally:
        stop_all()
        net.destroy()
