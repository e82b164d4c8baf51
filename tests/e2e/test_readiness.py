"""Readiness and expected failures on a real containerd and `shoal run`.

- Requests from the moment shoal's port opens, while its routing still starts: never 5xx.
- containerd stopped: /readyz turns 503, tags are plain OCI misses (so containerd would try
  its next host), one log line says so and no request logs a traceback; containerd back:
  /readyz is 200 again and tags resolve again.
- Image records kept in memory follow containerd: a deleted tag is a miss, a moved one
  answers its new digest.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import node_pool
from tests.harness.cluster import wait_until
from tests.harness.containerd import ContainerdNode
from tests.harness.registry import http_request
from tests.harness.shoal import ShoalDaemon
from tests.harness.upstream import Upstream

pytestmark = pytest.mark.e2e


@dataclass
class World:
    node: ContainerdNode
    shoal: ShoalDaemon
    registry: Upstream

    def url(self, path: str) -> str:
        return f"{self.shoal.url}{path}"

    def tag_head(self, repo: str, tag: str = "v1") -> tuple[int, dict[str, str], bytes]:
        ns = self.registry.registry.host
        return http_request(self.url(f"/v2/{repo}/manifests/{tag}?ns={ns}"), method="HEAD")

    def ready(self) -> int:
        return http_request(f"{self.shoal.metrics_url}/readyz")[0]

    def problems(self) -> list[dict]:
        return [e for e in self.shoal.log_lines() if e.get("level") == "error" or "error" in e]


@pytest.fixture(scope="module")
def world(registry: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("ready")
    registry.registry.start()  # again, if an earlier module's stop_all() ended it
    with node_pool(base) as make:
        node = make("ready")
        node.pull(registry.refs["oci"], via_hosts=False, plain_http=True)
        # A static peer that never answers: routing starts, and stays without peers.
        nobody = "/ip4/127.0.0.1/tcp/9"
        args = ["--ready-alone", "true", "--bootstrap", "static", "--bootstrap-peers", nobody,
                # Readiness, not tenancy: the node's image is shared from the first sync on,
                # without waiting for shoal to learn that its registry serves it to anyone.
                "--share-registries", registry.registry.host]  # fmt: skip
        shoal = ShoalDaemon(node, extra_args=args)
        answers: list[int] = []
        stop = threading.Event()

        def hammer() -> None:  # from before the port opens until shoal is ready
            miss = f"{shoal.url}/v2/test/oci/blobs/sha256:{'0' * 64}?ns={registry.registry.host}"
            tag = f"{shoal.url}/v2/test/oci/manifests/v1?ns={registry.registry.host}"
            while not stop.is_set():
                for url in (miss, tag):
                    try:
                        answers.append(http_request(url, method="HEAD", timeout=10)[0])
                    except OSError:
                        time.sleep(0.01)  # not listening yet

        hammering = threading.Thread(target=hammer)
        hammering.start()
        try:
            shoal.start()
            world = World(node, shoal, registry)
            wait_until(lambda: world.ready() == 200, 30, "shoal ready")
        finally:
            stop.set()
            hammering.join(30)
        assert answers and all(a < 500 for a in answers), sorted(set(answers))
        try:
            yield world
        finally:
            shoal.stop()


def test_started_without_5xx_and_ready(world: World) -> None:
    assert world.ready() == 200
    status, headers, _ = world.tag_head("test/oci")
    assert status == 200 and headers["docker-content-digest"] == world.registry.digest("oci")
    assert not world.problems()


def test_containerd_down_is_not_ready_and_tags_are_plain_misses(world: World) -> None:
    world.node.stop()
    try:
        wait_until(lambda: world.ready() == 503, 20, "/readyz reports containerd down")
        for _ in range(20):
            status, headers, _ = world.tag_head("test/oci")
            assert status == 404
            assert headers["content-type"].startswith("application/json")
            status, _, body = http_request(world.url(
                f"/v2/test/oci/manifests/v1?ns={world.registry.registry.host}"))  # fmt: skip
            assert status == 404
            assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    finally:
        world.node.start()
    wait_until(lambda: world.ready() == 200, 60, "/readyz 200 once containerd is back")
    wait_until(lambda: world.tag_head("test/oci")[0] == 200, 30, "tags resolve again")
    said = [e["msg"] for e in world.shoal.log_lines() if "containerd is" in e.get("msg", "")]
    assert len([m for m in said if "not answering" in m]) == 1, said
    assert any("answering again" in m for m in said), said
    assert not world.problems(), world.problems()[:3]


def test_deleted_and_moved_tags_are_never_served_from_memory(world: World) -> None:
    ref = world.registry.refs["oci"]
    other = world.registry.refs["docker"]
    world.node.pull(other, via_hosts=False, plain_http=True)
    moved = ref.rsplit(":", 1)[0] + ":moving"
    world.node.ctr("images", "tag", "--force", ref, moved)
    # A new tag is answered once the sharing rules saw it (the catalog's next sync, soon).
    wait_until(
        lambda: (
            world.tag_head("test/oci", "moving")[1].get("docker-content-digest")
            == world.registry.digest("oci")
        ),
        30,
        "the new tag answers",
    )
    for _ in range(5):  # kept in memory now
        headers = world.tag_head("test/oci", "moving")[1]
        assert headers.get("docker-content-digest") == world.registry.digest("oci")
    world.node.ctr("images", "tag", "--force", other, moved)
    wait_until(
        lambda: world.tag_head("test/oci", "moving")[1].get("docker-content-digest")
        == world.registry.digest("docker"),
        10, "the moved tag answers its new digest",
    )  # fmt: skip
    world.node.remove_image(moved)
    wait_until(lambda: world.tag_head("test/oci", "moving")[0] == 404, 10, "a deleted tag misses")
    assert world.tag_head("test/oci")[0] == 200  # the others stay
