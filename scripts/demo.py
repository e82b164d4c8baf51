"""A local multi-node demo of shoal on real parts: a registry, three nodes, a pull served by peers.

Each node is a network namespace with its own address, its own containerd and its own shoal;
`shoal configure` points the node's containerd at its local shoal. The shoals find each other
over their libp2p DHT.

1. A docker-registry holds a 3-layer test image (built offline, pushed with skopeo).
2. Node 1's containerd pulls it through its shoal, which fetches it from the registry once.
3. The registry is stopped.
4. Nodes 2 and 3 pull the same image through their own shoal, which finds node 1 (and then
   each other) in the DHT and sends containerd there for the layers; the serving shoal verifies
   every byte against its digest before a response completes.

Run it with `sudo ./scripts/demo` (installs what is missing first); containerd is 2.3.7 unless
SHOAL_CONTAINERD names another version (tests/harness/runtime.py). Traffic stays inside network
namespaces the demo creates; every process and namespace is removed at the end.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import images
from tests.harness.cluster import Cluster, Node, wait_until
from tests.harness.netns import Network
from tests.harness.procs import stop_all
from tests.harness.registry import Registry
from tests.harness.runtime import selected


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def served(node: Node, source: str) -> tuple[int, float]:
    count = node.metric("shoal_requests_total", source=source)
    return int(count), node.metric("shoal_bytes_served_total", source=source) / 1e6


def to_peers(node: Node) -> float:
    return node.metric("shoal_bytes_to_peers_total")


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    net = Network("demo").create()
    try:
        say("starting docker-registry and pushing a 3-layer test image")
        reg_ns = net.add("registry")
        registry = Registry(base / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
        image = images.large_image(48, layers=3, seed=1, name="demo")
        ref = images.push(image, registry, "demo/app", "v1")
        print(f"    {ref}  ({image.total_size / 1e6:.1f} MB, manifest {image.digest[:19]}…)")

        version = selected().version
        say(f"three nodes, each with its own address, containerd {version} and shoal")
        mirrored = ["--mirror-registries", registry.host, "--upstream-insecure", registry.host]
        cluster = Cluster(net, base, registry, shoal_args=mirrored)
        for i in range(3):
            cluster.add_node(f"node{i + 1}")
        for node in cluster.nodes:
            cluster.start_shoal(node)
        cluster.wait_connected()
        n1, n2, n3 = cluster.nodes
        for node in cluster.nodes:
            print(f"    {node.ns.short_name}: {node.ns.ip}, peer ID {node.peer_id()[:20]}…")
        print("    node 2's hosts.toml, written by `shoal configure`:")
        print((n2.containerd.hosts_dir / registry.host / "hosts.toml").read_text().rstrip())

        say("node 1 pulls the image: shoal fetches each blob from the registry once")
        n1.containerd.pull(ref)
        fetched = [served(node, "upstream") for node in cluster.nodes]
        print(f"    the shoals served {sum(c for c, _ in fetched)} responses "
              f"({sum(mb for _, mb in fetched):.1f} MB) fetched from upstream")  # fmt: skip
        layer = image.layers[0].digest
        # Node 1 advertises the image once its containerd holds it, since the registry served
        # it to shoal without credentials: public, so shareable.
        tag = f"{registry.host}/demo/app:v1"
        wait_until(lambda: n1.ns.ip in n2.providers(tag), 30, "node 1 advertised the image")

        say("stopping the registry: from now on it cannot serve a single byte")
        registry.stop()

        for node in (n2, n3):
            say(f"{node.ns.short_name} pulls the image through its own shoal")
            before = sum(to_peers(n) for n in cluster.nodes if n is not node)
            spooled = served(node, "upstream")
            started = time.monotonic()
            node.containerd.pull(ref)
            took = time.monotonic() - started
            same = all(node.containerd.read_blob(d) == n1.containerd.read_blob(d)
                       for d in image.blobs)  # fmt: skip
            count = node.metric("shoal_requests_total", source="peer")
            redirected = node.metric("shoal_requests_total", source="peer", code="307")
            from_peers = sum(to_peers(n) for n in cluster.nodes if n is not node) - before
            print(f"    pulled in {took:.2f} s, byte-identical to node 1: {same}")
            print(f"    its shoal found {count:.0f} objects at peers: {redirected:.0f} by"
                  " redirecting containerd there, the rest relayed through its spool")  # fmt: skip
            print(f"    peers sent {from_peers / 1e6:.1f} MB for it")
            own = [now - then for now, then in zip(served(node, "upstream"), spooled, strict=True)]
            if own[0]:  # the registry is down: these were fetched earlier, for the cluster
                why = "as the image's designated fetcher, it fetched them when node 1 pulled"
                print(f"    its own spool served {own[0]:.0f} responses ({own[1]:.1f} MB): {why}")
            if not same:
                return 1
        say("who holds the first layer now (from the DHT)")
        print(f"    {n3.ns.short_name} sees providers: {', '.join(n3.providers(layer))}")
        return 0
    finally:
        stop_all()
        net.destroy()
        shutil.rmtree(base, ignore_errors=True)  # GBs of containerd roots


if __name__ == "__main__":
    sys.exit(main())
