"""Real containerd pulls through shoal, served from another node's content store (issue 2).

Node A pulls test images straight from a real docker-registry. Node B's hosts.toml, written by
`shoal configure`, points at node A's shoal. With the registry stopped, B's pulls can only
succeed with bytes that A's shoal served.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.files import snapshot
from tests.harness import images
from tests.harness.containerd import ContainerdNode
from tests.harness.cutproxy import CutProxy
from tests.harness.procs import stop_all
from tests.harness.registry import Registry
from tests.harness.shoal import ShoalDaemon

pytestmark = pytest.mark.e2e


@dataclass
class World:
    base: Path
    registry: Registry
    a: ContainerdNode
    shoal_a: ShoalDaemon
    refs: dict[str, str]
    built: dict[str, images.TestImage]


def shoal_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "shoal.cli", *args], check=True, timeout=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("local")
    try:
        registry = Registry(base / "registry").start()
        built: dict[str, images.TestImage] = {
            "oci": images.oci_image("e2e-oci"),
            "docker": images.docker_schema2_image("e2e-docker"),
            "index": images.multiarch_index("e2e-multi"),
            "large": images.large_image(12, layers=2, seed=7, name="e2e-large"),
        }
        refs = {k: images.push(img, registry, f"e2e/{k}", "v1") for k, img in built.items()}
        a = ContainerdNode("a", base / "a").start()
        for ref in refs.values():
            a.pull(ref, via_hosts=False, plain_http=True)
        # Pulled straight from a registry outside shoal's allow-list: shared by the operator's
        # choice, as an air-gapped registry's images would be.
        shoal_a = ShoalDaemon(a, extra_args=["--share-registries", registry.host]).start()
        shoal_a.wait_synced()
        yield World(base, registry, a, shoal_a, refs, built)
    finally:
        stop_all()


def fresh_node(world: World, name: str, mirror: str) -> ContainerdNode:
    node = ContainerdNode(name, world.base / name).start()
    shoal_cli("configure", "--hosts-dir", str(node.hosts_dir), "--mirror", mirror,
              "--registry", f"{world.registry.host}=http://{world.registry.host}")  # fmt: skip
    return node


def assert_same_content(a: ContainerdNode, b: ContainerdNode, image: images.TestImage) -> None:
    """Every blob of `image` that B holds is byte-identical to A's, and B holds what it needs."""
    needed = set(image.for_platform().blobs)
    assert needed <= b.content_digests()
    for digest in needed | (b.content_digests() & set(image.blobs)):
        assert b.read_blob(digest) == a.read_blob(digest), digest


def test_miss_falls_back_to_the_registry(world: World) -> None:
    """An image node A lacks: shoal answers 404 at once and containerd goes to the registry."""
    extra = images.oci_image("e2e-only-upstream")
    ref = images.push(extra, world.registry, "e2e/only-upstream", "v1")
    b = fresh_node(world, "b-miss", world.shoal_a.url)
    mark = world.registry.mark()
    b.pull(ref)
    assert b.images()[ref] == extra.digest
    assert any(path.startswith("/v2/e2e/only-upstream/") for _, path, _ in
               world.registry.requests(since=mark))  # fmt: skip
    misses = world.shoal_a.metric("shoal_misses_total")
    assert misses >= 1
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            f"{world.shoal_a.url}/v2/e2e/only-upstream/manifests/v1?ns={world.registry.host}"
        )
    assert err.value.code == 404
    b.stop()


def test_pulls_by_tag_digest_and_index_with_registry_stopped(world: World) -> None:
    world.registry.stop()
    b = fresh_node(world, "b", world.shoal_a.url)
    before = world.shoal_a.metric("shoal_requests_total", source="local")
    for key in ("oci", "docker", "index", "large"):
        b.pull(world.refs[key])
        assert b.images()[world.refs[key]] == world.built[key].digest
        assert_same_content(world.a, b, world.built[key])
    # By digest: a second node, so nothing is already local.
    c = fresh_node(world, "c", world.shoal_a.url)
    for key in ("oci", "index"):
        by_digest = world.refs[key].rsplit(":", 1)[0] + "@" + world.built[key].digest
        c.pull(by_digest)
        assert_same_content(world.a, c, world.built[key])
    served = world.shoal_a.metric("shoal_requests_total", source="local") - before
    assert served >= 10  # manifests and blobs, every one of them from A's store
    world.registry.start()
    b.stop()
    c.stop()


def test_cut_body_resumes_with_range(world: World) -> None:
    """A blob body cut mid-way: containerd asks for the rest with Range, shoal answers 206."""
    # Cut well past containerd's 1 MiB copy buffer, so the received part is surely in its ingest.
    proxy = CutProxy(world.shoal_a.url, cut_after=4_000_000).start()
    try:
        world.registry.stop()
        d = fresh_node(world, "d", proxy.url)
        d.pull(world.refs["large"])
        assert_same_content(world.a, d, world.built["large"])
        cut = [s for s in proxy.seen if s.cut]
        assert len(cut) == 1
        resumed = [s for s in proxy.seen if s.path == cut[0].path and s.range]
        assert resumed, proxy.seen
        offset = int(resumed[0].range.removeprefix("bytes=").rstrip("-"))
        assert 0 < offset <= 4_000_000
        assert resumed[0].status == 206
        assert resumed[0].content_range.startswith(f"bytes {offset}-")
        d.stop()
    finally:
        proxy.stop()
        world.registry.start()


def test_configure_then_cleanup_leaves_hosts_dir_identical(world: World) -> None:
    node = ContainerdNode("e", world.base / "e")
    hosts = node.hosts_dir
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text('server = "https://registry-1.docker.io"\n')
    before = snapshot(hosts)
    shoal_cli("configure", "--hosts-dir", str(hosts), "--mirror", world.shoal_a.url,
              "--registry", "docker.io", "--registry", world.registry.host,
              "--registry", "_default")  # fmt: skip
    assert snapshot(hosts) != before
    shoal_cli("cleanup", "--hosts-dir", str(hosts))
    assert snapshot(hosts) == before


def test_sigterm_lets_an_inflight_download_finish(world: World) -> None:
    """SIGTERM: a body already streaming still completes (the reader here is slow, so the
    server is still sending), then shoal exits 0."""
    shoal = ShoalDaemon(world.a).start()
    layer = world.built["large"].layers[0]
    url = f"{shoal.url}/v2/e2e/large/blobs/{layer.digest}"
    resp = urllib.request.urlopen(url, timeout=30)
    body = bytearray(resp.read(1024))  # the response is under way
    assert shoal.proc is not None
    shoal.proc.signal(signal.SIGTERM)
    signalled = time.monotonic()
    alive_while_sending = False
    while chunk := resp.read(64 * 1024):
        body += chunk
        time.sleep(0.05)
        if time.monotonic() - signalled > 0.5 and not alive_while_sending:
            alive_while_sending = shoal.proc.popen.poll() is None
    assert hashlib.sha256(body).hexdigest() == layer.hex
    assert alive_while_sending
    assert shoal.proc.popen.wait(15) == 0
    assert any(line.get("msg") == "stopping" for line in shoal.log_lines())
