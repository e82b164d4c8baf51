"""A hung registry (SIGSTOP: connections are accepted, nothing is answered) must not make pulls
wait: tags resolve from the peers holding the image, and misses are answered 404 at once.

3 nodes, each its own network namespace with containerd and shoal; the registry in a namespace
of its own, allowed upstream (`upstream-first` tags, the default). Each trial starts every shoal
afresh (no breaker open yet), has nodes 1 and 2 pull a new image with the registry up, stops the
registry, and then on node 3: a blob no one holds, a tag no one holds (both must be 404), and a
CRI pull by tag, retried as the kubelet does (3 attempts, 1 s apart). Times are printed.

    SHOAL_SOAK_TRIALS=20 .venv/bin/pytest tests/e2e/test_upstream_hung.py -s   # the full soak
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.harness import images
from tests.harness.cluster import Cluster, Node, wait_until
from tests.harness.cri import cri_pull
from tests.harness.netns import Network
from tests.harness.procs import HarnessError, stop_all
from tests.harness.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.slow]

TRIALS = int(os.environ.get("SHOAL_SOAK_TRIALS", "3"))
ATTEMPTS, PAUSE, ATTEMPT_TIMEOUT = 3, 1.0, 60.0  # the kubelet's retries, and a deadline each


@dataclass
class World:
    net: Network
    registry: Registry
    cluster: Cluster

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("hung")
    net = Network("hung").create()
    try:
        reg_ns = net.add("reg")
        registry = Registry(base / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
        allowed = registry.host
        cluster = Cluster(net, base, registry, shoal_args=[
            "--mirror-registries", allowed, "--upstream-insecure", allowed,
            "--resync-interval", "5"])  # fmt: skip
        for i in range(3):
            cluster.add_node(f"h{i + 1}")
        for node in cluster.nodes:
            cluster.start_shoal(node)
        cluster.wait_connected()
        yield World(net, registry, cluster)
    finally:
        if registry.proc is not None:
            registry.proc.signal(signal.SIGCONT)
        stop_all()
        net.destroy()


@dataclass
class Trial:
    pull_seconds: float = 0.0
    failed_attempts: int = 0
    errors: list[str] = field(default_factory=list)
    blob_miss_seconds: float = 0.0
    tag_miss_seconds: float = 0.0


def _timed(node: Node, path: str, method: str = "GET") -> tuple[int, float, bytes]:
    started = time.monotonic()
    status, _, body = node.request(path, method=method)
    return status, time.monotonic() - started, body


def _kubelet_pull(node: Node, ref: str, trial: Trial) -> bool:
    started = time.monotonic()
    for attempt in range(ATTEMPTS):
        try:
            cri_pull(node.containerd.socket, ref, timeout=ATTEMPT_TIMEOUT)
        except HarnessError as exc:
            trial.failed_attempts += 1
            trial.errors.append(str(exc)[:300])
            if attempt < ATTEMPTS - 1:
                time.sleep(PAUSE)
            continue
        trial.pull_seconds = time.monotonic() - started
        return True
    return False


def _restart_shoals(world: World) -> None:
    """Fresh shoals: every breaker closed, as when a registry hangs for the first time."""
    for node in world.nodes:
        assert node.shoal is not None
        node.shoal.stop()
        world.cluster.start_shoal(node)
    world.cluster.wait_connected()


def test_a_hung_registry_costs_pulls_and_misses_little(world: World) -> None:
    n1, n2, n3 = world.nodes
    reg = world.registry.host
    trials: list[Trial] = []
    for i in range(TRIALS):
        image = images.oci_image(f"hung-{i}")  # three small layers, new every trial
        ref = images.push(image, world.registry, f"hung/app{i}", "v1")
        repo = f"hung/app{i}"
        _restart_shoals(world)
        cri_pull(n1.containerd.socket, ref, timeout=120)  # registry up: fetched once upstream
        cri_pull(n2.containerd.socket, ref, timeout=120)
        tag_key = f"{reg}/{repo}:v1"
        wait_until(lambda k=tag_key: {n1.ns.ip, n2.ns.ip} <= set(n3.providers(k)), 30,
                   "nodes 1 and 2 advertise the tag")  # fmt: skip
        trial = Trial()
        assert world.registry.proc is not None
        world.registry.proc.signal(signal.SIGSTOP)
        try:
            nobody = images.oci_image(f"nobody-{i}").layers[0].digest
            status, trial.blob_miss_seconds, body = _timed(
                n3, f"/v2/{repo}/blobs/{nobody}?ns={reg}"
            )
            assert status == 404 and b"BLOB_UNKNOWN" in body
            status, trial.tag_miss_seconds, body = _timed(
                n3, f"/v2/{repo}/manifests/nosuchtag?ns={reg}", "HEAD"
            )
            assert status == 404
            pulled = _kubelet_pull(n3, ref, trial)
        finally:
            world.registry.proc.signal(signal.SIGCONT)
        trials.append(trial)
        print(f"trial {i + 1}: pull {trial.pull_seconds:.1f}s, failed attempts "
              f"{trial.failed_attempts}, blob miss {trial.blob_miss_seconds:.2f}s, tag miss "
              f"{trial.tag_miss_seconds:.2f}s {trial.errors}")  # fmt: skip
        assert pulled, trial.errors
        assert n3.containerd.images()[ref] == image.digest
        assert trial.failed_attempts <= 1, trial.errors
    pulls = [t.pull_seconds for t in trials]
    misses = [max(t.blob_miss_seconds, t.tag_miss_seconds) for t in trials]
    for node in world.nodes:  # expected conditions: a few lines, no tracebacks or errors
        assert node.shoal is not None
        bad = [e for e in node.shoal.log_lines() if e.get("level") == "error" or "error" in e]
        assert not bad, bad[:3]
    failed = sum(t.failed_attempts for t in trials)
    print(f"{TRIALS} trials: pull by tag median {statistics.median(pulls):.1f}s, max "
          f"{max(pulls):.1f}s; 404 for a miss median {statistics.median(misses):.2f}s, max "
          f"{max(misses):.2f}s; failed attempts {failed}")  # fmt: skip
