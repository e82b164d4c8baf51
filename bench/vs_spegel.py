"""shoal and Spegel on the same simulated cluster, side by side, printed as shoal/Spegel ratios.

    sudo .venv/bin/python bench/vs_spegel.py [--scenario a,b,c,d] [--runs 3] [--nodes 8]
        [--rate 200mbit] [--containerd 2.3.7] [--warm-gib 4]

Spegel is built from its Go module by scripts/go-install (tests/harness/gotools.py): v0.7.3,
because the Go module proxy reachable here refuses v0.7.4 (403). Both run as their DaemonSets
would, one per node, on the nodes of bench/rollout.py's harness: a network namespace, a
containerd and the mirror per node, a docker-registry in a namespace of its own (on port 80, as
registries are named without a port: containerd's distribution-source labels drop the port,
and Spegel finds content by those labels). hosts.toml comes from each one's own tool (`shoal
configure`, `spegel configuration`), peers find each other by static bootstrap. Nodes pull
through CRI PullImage, as the kubelet does. Every scenario builds fresh nodes for each system;
within a run the two alternate, and the order flips from run to run.

Scenarios (`--scenario a` runs one alone):
  a. one node holds a 4-layer 128 MiB image; the others pull it one after another (a1,
     Spegel's own benchmark shape), then, on fresh nodes, all at once (a2);
  b. a new 128 MiB image that no node holds, all nodes at once, registry link `--rate`;
  c. one node holds a 1 GiB single-layer image; one other node pulls it;
  d. one node holds the image of a., the registry is stopped, the others pull it by tag.
The registry's link is shaped to `--rate` (tbf, as rollout does) during every measured pull;
node links are not shaped.

Measured per run, over the measured pulls only:
- time: wall seconds until the last pull returned;
- registry bytes: blob bytes docker-registry's access log says it sent, per image size;
- CPU-seconds: user + system time of the mirror process on every node, summed (/proc/<pid>/stat,
  all threads; neither mirror forks), and containerd's the same way, for context;
- peak RSS: the kernel's high-water mark of each mirror process (VmHWM), reset through
  /proc/<pid>/clear_refs when the pulls start; the largest node's, and all nodes' summed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._measure import cpu_seconds, peak_rss, reset_peak_rss, warm_memory
from bench._mirrors import Mirror, Shoal, Spegel, settle
from tests.harness import gotools, images
from tests.harness.cluster import Cluster, Node
from tests.harness.cri import cri_pull
from tests.harness.netns import Namespace, Network
from tests.harness.procs import HarnessError, stop_all
from tests.harness.registry import Registry

MiB = 1 << 20


@dataclass
class Sample:
    seconds: float
    registry_bytes: int
    image_bytes: int
    cpu: float  # mirror processes, all nodes
    cpu_by_node: list[float]
    containerd_cpu: float
    peak_rss: int  # the largest node's mirror
    peak_rss_sum: int
    failed: list[str]  # pulls that failed, with containerd's error


@dataclass
class Bench:
    args: argparse.Namespace
    base: Path
    net: Network
    reg_ns: Namespace
    registry: Registry
    spegel_binary: Path
    built: dict[str, images.Image] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    containerd_version: str = ""

    def image(self, key: str) -> tuple[str, images.Image]:
        """The scenario images, built and pushed once per invocation."""
        if key not in self.built:
            mib, layers, seed = {"A": (128, 4, 11), "B": (128, 4, 12), "C": (1024, 1, 13)}[key]
            image = images.large_image(mib, layers=layers, seed=seed, name=f"vs-{key}")
            images.push(image, self.registry, f"vs/{key.lower()}", "v1")
            self.built[key] = image
            self.refs[key] = f"{self.registry.host}/vs/{key.lower()}:v1"
        return self.refs[key], self.built[key]

    def cluster(self, mirror: Mirror, label: str, count: int) -> Cluster:
        shoal_args = ["--mirror-registries", self.registry.host,
                      "--upstream-insecure", self.registry.host, *self.args.shoal_arg]  # fmt: skip
        cluster = Cluster(self.net, self.base / label, self.registry, shoal_args=shoal_args)
        for i in range(count):
            cluster.add_node(f"{label}-{i}", configure=mirror.configures_hosts())
        if not self.containerd_version:
            out = cluster.nodes[0].containerd.ctr("version").stdout
            server = out.split("Server:", 1)[-1]
            found = re.search(r"Version:\s*(\S+)", server)
            self.containerd_version = found.group(1) if found else "?"
        return cluster

    def seed(self, node: Node, ref: str) -> None:
        """The holder pulls straight from the registry, link unshaped (not measured)."""
        node.containerd.pull(ref, via_hosts=False, plain_http=True, timeout=900)

    def measure(
        self,
        mirror: Mirror,
        cluster: Cluster,
        image: images.Image,
        pulls: Callable[[], list[str]],
    ) -> Sample:
        nodes = cluster.nodes
        pids = [mirror.pid(n) for n in nodes]
        ctrd = [n.containerd.proc.pid for n in nodes if n.containerd.proc]
        warm_memory(self.args.warm_gib)
        for pid in pids:
            reset_peak_rss(pid)
        cpu0 = [cpu_seconds(p) for p in pids]
        ctrd0 = sum(cpu_seconds(p) for p in ctrd)
        mark = self.registry.mark()
        self.reg_ns.limit(self.args.rate)
        try:
            start = time.monotonic()
            failed = pulls()
            took = time.monotonic() - start
        finally:
            self.reg_ns.unlimit()
        cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
        peaks = [peak_rss(p) for p in pids]
        self.registry.settle(quiet=0.2, timeout=2)
        return Sample(
            seconds=took,
            registry_bytes=self.registry.bytes_sent(since=mark, blobs_only=True),
            image_bytes=image.total_size,
            cpu=sum(cpu),
            cpu_by_node=cpu,
            containerd_cpu=sum(cpu_seconds(p) for p in ctrd) - ctrd0,
            peak_rss=max(peaks),
            peak_rss_sum=sum(peaks),
            failed=failed,
        )

    def teardown(self, cluster: Cluster) -> None:
        for node in cluster.nodes:
            self.net.remove(node.ns.short_name)  # stops the node's containerd and mirror too
        shutil.rmtree(cluster.base, ignore_errors=True)


def pull(node: Node, ref: str, errors: list[str]) -> None:
    """A failed pull is a result (the mirror made it fail), recorded, not a bench error."""
    try:
        cri_pull(node.containerd.socket, ref)
    except HarnessError as exc:
        errors.append(f"{node.ns.short_name}: {exc}")


def pull_each(nodes: list[Node], ref: str) -> list[str]:
    errors: list[str] = []
    for node in nodes:
        pull(node, ref, errors)
    return errors


def pull_all(nodes: list[Node], ref: str) -> list[str]:
    errors: list[str] = []
    threads = [threading.Thread(target=pull, args=(n, ref, errors)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def held_by_one(b: Bench, mirror: Mirror, label: str, key: str, count: int) -> Cluster:
    """`count` fresh nodes, the first holding image `key`, every other one's mirror able to
    find it on that node."""
    ref, image = b.image(key)
    cluster = b.cluster(mirror, label, count)
    b.seed(cluster.nodes[0], ref)
    mirror.start(cluster)
    for node in cluster.nodes[1:]:
        mirror.wait_found(node, ref, image)
    settle()
    return cluster


def scenario_a(b: Bench, mirror: Mirror) -> dict[str, Sample]:
    ref, image = b.image("A")
    out = {}
    for label, pulls in (("a1 one after another", pull_each), ("a2 all at once", pull_all)):
        cluster = held_by_one(b, mirror, label[:2], "A", b.args.nodes)
        try:
            others = cluster.nodes[1:]
            out[label] = b.measure(mirror, cluster, image, lambda o=others, p=pulls: p(o, ref))
        finally:
            b.teardown(cluster)
    return out


def scenario_b(b: Bench, mirror: Mirror) -> dict[str, Sample]:
    ref, image = b.image("B")
    cluster = b.cluster(mirror, "b", b.args.nodes)
    try:
        mirror.start(cluster)
        settle()
        return {"b new image, all at once": b.measure(
            mirror, cluster, image, lambda: pull_all(cluster.nodes, ref))}  # fmt: skip
    finally:
        b.teardown(cluster)


def scenario_c(b: Bench, mirror: Mirror) -> dict[str, Sample]:
    ref, image = b.image("C")
    cluster = held_by_one(b, mirror, "c", "C", 2)
    try:
        return {"c 1 GiB layer, 1 peer": b.measure(
            mirror, cluster, image, lambda: pull_each(cluster.nodes[1:], ref))}  # fmt: skip
    finally:
        b.teardown(cluster)


def scenario_d(b: Bench, mirror: Mirror) -> dict[str, Sample]:
    ref, image = b.image("A")
    cluster = held_by_one(b, mirror, "d", "A", b.args.nodes)
    b.registry.stop()
    try:
        return {"d registry down, by tag": b.measure(
            mirror, cluster, image, lambda: pull_all(cluster.nodes[1:], ref))}  # fmt: skip
    finally:
        b.registry.start()
        b.teardown(cluster)


SCENARIOS = {"a": scenario_a, "b": scenario_b, "c": scenario_c, "d": scenario_d}


def sha256_rate() -> float:
    """Bytes per CPU-second one SHA-256 stream hashes on this machine (what shoal's
    verification costs per byte served)."""
    data = os.urandom(64 * MiB)
    start = time.process_time()
    for _ in range(4):
        hashlib.sha256(data).digest()
    return 4 * len(data) / (time.process_time() - start)


def spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else ("=" if a == 0 else "inf")


def report(results: dict[str, dict[str, list[Sample]]], b: Bench) -> None:
    args = b.args
    print(f"\nshoal vs Spegel {gotools.SPEGEL.version} (v0.7.4 is refused by the Go proxy here), "
          f"containerd {b.containerd_version}, {args.nodes} nodes, registry link {args.rate}, "
          f"{args.runs} run(s): median (min-max), ratio of medians shoal/Spegel")  # fmt: skip
    metrics: list[tuple[str, Callable[[Sample], float], str]] = [
        ("time s", lambda s: s.seconds, ".1f"),
        ("registry bytes / image", lambda s: s.registry_bytes / s.image_bytes, ".2f"),
        ("mirror CPU-s", lambda s: s.cpu, ".2f"),
        ("mirror peak RSS MiB", lambda s: s.peak_rss / MiB, ".0f"),
        ("  all nodes' RSS MiB", lambda s: s.peak_rss_sum / MiB, ".0f"),
        ("containerd CPU-s", lambda s: s.containerd_cpu, ".1f"),
    ]
    width = 24
    print(f"{'scenario':26} {'':{width}} {'shoal':>20} {'Spegel':>20} {'shoal/Spegel':>13}")
    for label, by_system in results.items():
        first = True
        for name, get, fmt in metrics:
            sh = [get(s) for s in by_system["shoal"]]
            sp = [get(s) for s in by_system["Spegel"]]
            head = label if first else ""
            first = False
            print(f"{head:26} {name:{width}} {spread(sh, fmt):>20} {spread(sp, fmt):>20} "
                  f"{ratio(statistics.median(sh), statistics.median(sp)):>13}")  # fmt: skip
    print("pulls failed (all runs):")
    for label, by_system in results.items():
        counts = {m: sum(len(s.failed) for s in v) for m, v in by_system.items()}
        print(f"  {label:26} " + ", ".join(f"{m} {n}" for m, n in counts.items()))
    rate = sha256_rate()
    print(
        f"(one SHA-256 stream hashes {rate / 1e9:.2f} GB per CPU-second here: shoal verifies "
        f"every byte it serves, 1 GiB costs it {(1 << 30) / rate:.2f} CPU-s in hashing alone)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="a,b,c,d", help="comma-separated: a,b,c,d")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rate", default="200mbit", help="the registry's link (tbf)")
    parser.add_argument(
        "--containerd", default="2.3.7",
        help="containerd version the harness runs (SHOAL_CONTAINERD); the bench prints the one "
        "that answered",
    )  # fmt: skip
    parser.add_argument(
        "--shoal-arg", action="append", default=[],
        help="extra `shoal run` argument, e.g. --shoal-arg=--peer-transfer=relay",
    )  # fmt: skip
    parser.add_argument(
        "--spegel-arg", action="append", default=[],
        help="extra `spegel registry` argument, e.g. --spegel-arg=--mirror-resolve-timeout=1s",
    )  # fmt: skip
    parser.add_argument(
        "--warm-gib", type=float, default=4.0,
        help="GiB of memory written and freed before each measured phase (0: none)",
    )  # fmt: skip
    args = parser.parse_args()
    chosen = [c.strip() for c in args.scenario.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
    if args.containerd:
        os.environ["SHOAL_CONTAINERD"] = args.containerd

    # A stopped bench still removes its namespaces and GBs of containerd roots.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix="shoal-vs-spegel-"))
    net = Network("vs-spegel").create()
    results: dict[str, dict[str, list[Sample]]] = {}
    try:
        spegel_binary = gotools.binary(gotools.SPEGEL)
        reg_ns = net.add("reg")
        registry = Registry(base / "registry", host_ip=reg_ns.ip, port=80,
                            netns=reg_ns.name).start()  # fmt: skip
        b = Bench(args, base, net, reg_ns, registry, spegel_binary)
        mirrors: list[Mirror] = [Shoal(), Spegel(spegel_binary, args.spegel_arg)]
        for run in range(args.runs):
            for key in chosen:
                order = mirrors if run % 2 == 0 else mirrors[::-1]
                for mirror in order:
                    for label, sample in SCENARIOS[key](b, mirror).items():
                        results.setdefault(label, {}).setdefault(mirror.name, []).append(sample)
                        cpus = " ".join(f"{c:.1f}" for c in sample.cpu_by_node)
                        print(f"  run {run + 1} {label}, {mirror.name}: {sample.seconds:.1f} s, "
                              f"registry {sample.registry_bytes / MiB:.0f} MiB, CPU-s {cpus}, "
                              f"peak RSS {sample.peak_rss / MiB:.0f} MiB, "
                              f"{len(sample.failed)} pulls failed", flush=True)  # fmt: skip
                        for error in sample.failed:
                            print(f"    failed: {error[-300:]}")
    finally:
        stop_all()
        net.destroy()
        shutil.rmtree(base, ignore_errors=True)  # GBs of containerd roots
    report(results, b)
    if b.containerd_version.split("~")[0].split("+")[0] != args.containerd:
        print(f"NOTE: asked for containerd {args.containerd}, the harness ran "
              f"{b.containerd_version}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
