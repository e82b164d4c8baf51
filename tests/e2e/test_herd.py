"""A herd on capped links loses its busiest node mid-rollout (issue 15): every pull completes
with the right bytes and no failed attempt.

`SHOAL_HERD_NODES` nodes (default 8; 16 for the issue's size) and a registry, each in its own
network namespace with its link capped at 200 Mbit/s in both directions, pull one 4-layer image
at once through CRI `PullImage` (up to 3 attempts 1 s apart, as a kubelet), their shoals
running with `--herd-fanout 2` (`SHOAL_HERD_FANOUT=K`; `0` runs the star, no bound, for
comparison). Mid-rollout, once the node whose shoal serves the most peer streams (its
`shoal_herd_streams` gauge; the fastest sender over its link when no node exports it) has
received half the image itself, it dies, in one of two ways:
- the node crashes: its link goes silent and its containerd and shoal are killed. Every other
  pull completes and the registry sends at most 1.5x the image: the busiest node is usually
  the designated fetcher, and the next in line fetches only what the survivors still lack.
- only its shoal is killed: its own containerd moves on to the registry, the next host its
  hosts.toml lists, for what it still lacks, which costs the registry up to one more image, so
  the bound is 3x (measured 1.49x, 1.60x and 2.30x; before the rescue, every stranded node
  went to the registry: 4-5x).
Times are printed, never asserted.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import require_binaries, require_containerd, require_netns
from tests.e2e.test_faults import ATTEMPTS, Outcome, kubelet_pull
from tests.harness import images
from tests.harness.cluster import Cluster, Node
from tests.harness.netns import Namespace, Network
from tests.harness.procs import stop_all
from tests.harness.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.slow]

NODES = int(os.environ.get("SHOAL_HERD_NODES", "8"))
MIB = int(os.environ.get("SHOAL_HERD_MIB", "64"))
RATE = "200mbit"
# "0": the star, no bound (a comparison the goal does not apply to).
FANOUT = os.environ.get("SHOAL_HERD_FANOUT", "2")
GAUGE = "shoal_herd_streams"
MIDWAY = 0.5  # the victim has received this much of the image: its own pull half done


@dataclass
class Herd:
    cluster: Cluster
    reg_ns: Namespace
    image: images.Image
    ref: str

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes


@pytest.fixture
def herd(tmp: Path) -> Iterator[Herd]:
    require_netns()
    require_containerd()
    require_binaries("docker-registry", "skopeo")
    net = Network("herd").create()
    try:
        reg_ns = net.add("reg")
        registry = Registry(tmp / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
        image = images.large_image(MIB, layers=4, seed=15, name="herd")
        ref = images.push(image, registry, "herd/app", "v1")
        reg_ns.limit(RATE, direction="both")
        host = registry.host
        herd_args = ["--herd-fanout", FANOUT]
        cluster = Cluster(net, tmp, registry, shoal_args=[
            "--mirror-registries", host, "--upstream-insecure", host, *herd_args])  # fmt: skip
        for i in range(NODES):
            cluster.add_node(f"h{i}").ns.limit(RATE, direction="both")
        for node in cluster.nodes:
            cluster.start_shoal(node)
        cluster.wait_connected()
        yield Herd(cluster, reg_ns, image, ref)
    finally:
        stop_all()
        net.destroy()


def gauge(node: Node, name: str) -> float | None:
    """A metric's value, None when the node's shoal does not export it (or is gone)."""
    assert node.shoal is not None
    try:
        with urllib.request.urlopen(f"{node.shoal.metrics_url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = [float(line.rpartition(" ")[2]) for line in text.splitlines()
              if line.startswith((name + " ", name + "{"))]  # fmt: skip
    return sum(values) if values else None


def busiest(
    world: Herd, sent0: dict[str, int], pending: list[threading.Thread]
) -> tuple[Node, str]:
    """Once the rollout is under way, the node serving the most peer streams now."""
    total = world.image.total_size
    got0 = {n.ns.short_name: n.ns.received_bytes() for n in world.nodes}
    last = {n.ns.short_name: n.ns.sent_bytes() for n in world.nodes}
    at = time.monotonic()
    deadline = at + 120
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now, then = time.monotonic(), at
        sent = {n.ns.short_name: n.ns.sent_bytes() for n in world.nodes}
        rate = {k: (sent[k] - last[k]) / (now - then) for k in sent}
        last, at = sent, now
        streams = {n.ns.short_name: gauge(n, GAUGE) for n in world.nodes}
        known = {k: v for k, v in streams.items() if v is not None}
        if known:
            name = max(known, key=lambda k: (known[k], rate[k]))
            how = f"{GAUGE} {known[name]:.0f} (others {sorted(known.values(), reverse=True)[1:]})"
            busy = known[name] >= 1
        else:
            name = max(rate, key=lambda k: rate[k])
            how = f"link tx {rate[name] / 1e6:.1f} MB/s (no node exports {GAUGE})"
            busy = rate[name] > 1e6
        victim = next(n for n in world.nodes if n.ns.short_name == name)
        got = (victim.ns.received_bytes() - got0[name]) / total
        if busy and got >= MIDWAY:
            assert any(t.is_alive() for t in pending), "every pull ended before a node was busy"
            return (
                victim,
                f"{how}, had sent {(sent[name] - sent0[name]) / total:.2f}x and "
                f"received {got:.2f}x",
            )
    raise AssertionError("no node served peers within 120 s")


@pytest.mark.parametrize(
    ("dies", "bound"),
    [("node", 1.5), ("shoal", 3.0)],
    ids=["the-node-crashes", "its-shoal-is-killed"],
)
def test_the_busiest_node_dies_mid_rollout(herd: Herd, dies: str, bound: float) -> None:
    total = herd.image.total_size
    registry = herd.cluster.registry
    mark, reg0 = registry.mark(), herd.reg_ns.sent_bytes()
    sent0 = {n.ns.short_name: n.ns.sent_bytes() for n in herd.nodes}
    outcomes: dict[str, Outcome] = {}
    threads = {
        n.ns.short_name: threading.Thread(
            target=lambda n=n: outcomes.__setitem__(n.ns.short_name, kubelet_pull(n, herd.ref)),
            daemon=True,  # a crashed node's pull is left to fail on its own
        )
        for n in herd.nodes
    }
    start = time.monotonic()
    for t in threads.values():
        t.start()
    victim, how = busiest(herd, sent0, list(threads.values()))
    struck = time.monotonic() - start
    assert victim.shoal is not None and victim.shoal.proc is not None
    if dies == "node":
        victim.ns.cut()
        assert victim.containerd.proc is not None
        victim.containerd.proc.signal(signal.SIGKILL)
    victim.shoal.proc.signal(signal.SIGKILL)
    survivors = [n for n in herd.nodes if dies == "shoal" or n is not victim]
    for node in survivors:
        threads[node.ns.short_name].join(600)
    victim.shoal.kill()  # reaped
    reg_sent = (herd.reg_ns.sent_bytes() - reg0) / total
    by_remote: dict[str, float] = {}
    names = {n.ns.ip: n.ns.short_name for n in herd.nodes}
    for r in registry.access_log(mark):
        if r.method == "GET" and "/blobs/" in r.path:
            who = names.get(r.remote.rsplit(":", 1)[0], r.remote)
            by_remote[who] = by_remote.get(who, 0.0) + r.size / total
    print(f"\nherd of {NODES}, {MIB} MiB, every link {RATE}, --herd-fanout {FANOUT}: "
          f"{victim.ns.short_name}'s {dies} died at {struck:.1f} s ({how}); registry link "
          f"sent {reg_sent:.2f}x the image, blob bodies to "
          + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(by_remote.items())))  # fmt: skip
    for name, o in sorted(outcomes.items()):
        print(f"  {name}: {o.seconds:.1f} s, failed attempts {o.failed_attempts}"
              + (f" ({o.errors[0][:120]})" if o.errors else ""))  # fmt: skip

    for node in survivors:
        name = node.ns.short_name
        assert name in outcomes, f"{name}: no pull outcome"
        o = outcomes[name]
        assert o.failed_attempts < ATTEMPTS, f"{name}: {o.errors}"
        for layer in herd.image.layers:
            assert node.containerd.read_blob(layer.digest) == layer.data, name
    for node in survivors:
        o = outcomes[node.ns.short_name]
        assert o.failed_attempts == 0, f"{node.ns.short_name}: {o.errors}"
    assert reg_sent <= bound, f"the registry sent {reg_sent:.2f}x the image"
