"""A herd on real links: N nodes pull one image at once and every link is a limit, the registry's
too (issue 15: what a star costs the node that serves it, and what a tree of bounded fan-out
does instead).

    sudo .venv/bin/python bench/herd.py [--nodes 16] [--mib 56] [--layers 4] [--rate 200mbit]
        [--designs star,tree] [--fanout 2] [--runs 1] [--warm-gib 4] [--shoal-arg=...]
        [--profile DIR]           (py-spy samples of every shoal per phase; costs CPU itself)
        [--containerd 2.3.7]      (or SHOAL_CONTAINERD=<version>; see tests/harness/runtime.py)

Per run, each phase on fresh containerd stores and fresh shoals, started once every shoal's
routing table has settled (`shoal_routing_table_settled`, as on a cluster that has run a
while), nodes pulling through CRI PullImage as the kubelet does:
- floor:  all N nodes straight from the registry with no link limit anywhere: the fastest N
          simultaneous pulls this host's cores allow (as bench/rollout.py's last row);
- 1 node: one node alone through its shoal, its link and the registry's capped;
- each design: all N nodes at once through their shoals, every link capped in both directions
          (tbf on both ends of each veth), the registry's too. star: `--herd-fanout 0`, no
          bound on the streams a node sends per blob (today's behaviour: a node asks the holders
          the DHT names; the designated fetcher holds a blob first, so most streams hang off
          it, and nodes relaying it are asked too once advertised); tree:
          `--herd-fanout K`.
Per design it prints the time until the last node finished (vs 1 node, vs the floor), the
registry's blob bytes / image (its access log; its link's bytes next to it), and the bytes each
node sent over its link / image: every packet it sent during the phase, blob bodies, ACKs of
what it received, DHT and HEADs alike (nothing subtracted), the most and which node, with that
node's shoal's own count of body bytes sent to peers (shoal_bytes_to_peers_total). CPU seconds
of the shoals (and of that their routing threads) and containerds, since all nodes share this
host's cores, and what the rollout asked of the DHT (the shoals' routing counters, summed).
Goals (issue 15): registry <= 1.1x the image, no node sends > 3x, the last node done <= 1.5x the
floor.
With the tree, each run also has two pair phases: 2 nodes capped, one relaying the image to
the other as it arrives (what a shoal's receiving and sending cost, per node; the quieter of
the two calibrates). Before each phase's pulls, the settled cluster's steady CPU is sampled
(the quietest of four 1 s windows). At the end, per run with star and tree, the
bench/herd_model.py line whose CPU costs come from that run's floor, 1-node and pair phases,
checking its tree and star times (docs/herd.md).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _herd_cpu
from bench._measure import cpu_seconds, node_arguments, thread_cpu_seconds, warm_memory
from bench.rollout import fetch_all
from tests.harness import images
from tests.harness.cluster import Cluster, Node
from tests.harness.netns import Namespace, Network
from tests.harness.procs import stop_all
from tests.harness.registry import Registry
from tests.harness.runtime import choose

GOAL_REGISTRY, GOAL_SENT, GOAL_FLOOR = 1.1, 3.0, 1.5
# The settled cluster's steady CPU, sampled before the pulls: the quietest of IDLE_WINDOWS
# windows of IDLE_SAMPLE s (a burst, such as a peer's reconnect, is not steady work).
IDLE_SAMPLE, IDLE_WINDOWS = 1.0, 4
PAIRS = 2  # pair phases per run; the model takes the one that spent the least CPU
ROUTING_THREAD = "shoal-trio"  # the kernel's name of a shoal's routing thread
DHT_COUNTERS = (
    "lookups", "lookup_local_hits", "lookup_store_only", "lookup_queries",
    "lookup_query_failures", "exchange_timeouts", "announce_streams",
)  # fmt: skip


def containerd_concurrency(node: Node) -> str:
    """containerd's layer download concurrency as its effective config says
    (`max_concurrent_downloads`: CRI's, and the transfer service's on 2.x)."""
    cd = node.containerd
    out = subprocess.run(
        [cd.runtime.binary("containerd"), "--config", str(cd.config_path), "config", "dump"],
        capture_output=True, text=True, env=cd.runtime.env(), check=False,
    )  # fmt: skip
    found = re.findall(r"max_concurrent_downloads\s*=\s*(\d+)", out.stdout)
    return ", ".join(found) if found else "not in `containerd config dump`"


@dataclass
class Phase:
    label: str
    took: float
    done: list[float]
    registry: float  # blob bytes the registry sent / image (its access log)
    registry_link: float  # bytes the registry's link carried out / image
    fetched_by: dict[str, float]  # node -> registry blob bytes it got / image
    sent: dict[str, float]  # node -> bytes its link carried out / image
    to_peers: dict[str, float]  # node -> shoal_bytes_to_peers_total / image
    cpu_shoal: float
    cpu_containerd: float
    peak_streams: int = 0  # the most GETs one node's shoal answered at once (1 node only)
    cpu_routing: float = 0.0  # of cpu_shoal: the shoals' routing (libp2p) threads
    dht: dict[str, float] = field(default_factory=dict)  # DHT counter -> sum over the nodes
    # Node -> (its shoal's CPU-s, its containerd's) over the pulls.
    cpu_by_node: dict[str, tuple[float, float]] = field(default_factory=dict)
    # The shoals' CPU-s per second on the settled cluster just before the pulls (all threads,
    # routing threads): their steady work, whatever moves.
    idle: tuple[float, float] = (0.0, 0.0)

    def top(self) -> tuple[str, float]:
        if not self.sent:
            return "-", 0.0
        name = max(self.sent, key=lambda n: self.sent[n])
        return name, self.sent[name]


@dataclass
class Bench:
    args: argparse.Namespace
    net: Network
    base: Path
    reg_ns: Namespace
    registry: Registry
    image: images.Image
    ref: str
    phases: int = 0
    concurrency: str = ""
    results: list[dict[str, Phase]] = field(default_factory=list)

    def phase(self, label: str, count: int, *, herd_args: list[str] | None, capped: bool) -> Phase:
        """`count` nodes pull at once; `herd_args` None: straight from the registry."""
        self.phases += 1
        rate = self.args.rate
        if capped:
            self.reg_ns.limit(rate, direction="both")
        else:
            self.reg_ns.unlimit()
        via_shoal = herd_args is not None
        shoal_args = ["--mirror-registries", self.registry.host, "--upstream-insecure",
                      self.registry.host, *(herd_args or []), *self.args.shoal_arg]  # fmt: skip
        cluster = Cluster(self.net, self.base / f"p{self.phases}", self.registry, shoal_args)
        try:
            for i in range(count):
                node = cluster.add_node(f"h{self.phases}-{i}")
                if capped:
                    node.ns.limit(rate, direction="both")
            if not self.concurrency:
                self.concurrency = containerd_concurrency(cluster.nodes[0])
            if via_shoal:
                for node in cluster.nodes:
                    cluster.start_shoal(node)
                cluster.wait_settled()  # as a cluster that has run a while
            else:
                for node in cluster.nodes:
                    node.containerd.write_hosts_toml(self.registry.host)
            return self.measure(label, cluster, via_shoal)
        finally:
            for node in cluster.nodes:
                node.ns.destroy()  # stops the node's containerd and shoal too
            shutil.rmtree(cluster.base, ignore_errors=True)

    def measure(self, label: str, cluster: Cluster, via_shoal: bool) -> Phase:
        nodes = cluster.nodes
        total = self.image.total_size

        shoals = [n.shoal.proc.pid for n in nodes if n.shoal and n.shoal.proc]

        def by_node() -> dict[str, tuple[float, float]]:
            """Node -> (its shoal's CPU-s, its containerd's), read once per mark."""
            return {
                n.ns.short_name: (
                    cpu_seconds(n.shoal.proc.pid) if n.shoal and n.shoal.proc else 0.0,
                    cpu_seconds(n.containerd.proc.pid) if n.containerd.proc else 0.0,
                )
                for n in nodes
            }

        def cpu() -> tuple[float, float, float, dict[str, tuple[float, float]]]:
            """(shoals, containerds, the shoals' routing threads, per node)."""
            per = by_node()
            routing = sum(thread_cpu_seconds(pid, ROUTING_THREAD) for pid in shoals)
            return sum(v[0] for v in per.values()), sum(v[1] for v in per.values()), routing, per

        warm_memory(self.args.warm_gib)
        idle = (0.0, 0.0)
        if via_shoal:
            windows = []
            for _ in range(IDLE_WINDOWS):
                before = cpu()
                time.sleep(IDLE_SAMPLE)
                after = cpu()
                windows.append(((after[0] - before[0]) / IDLE_SAMPLE,
                                (after[2] - before[2]) / IDLE_SAMPLE))  # fmt: skip
            idle = min(windows)
        peak = Peak(nodes[0]) if via_shoal and len(nodes) == 1 else None
        # Metric scrapes cost the shoals CPU too: read before the CPU mark and after the last.
        peers0 = {n.ns.short_name: to_peers(n) for n in nodes}
        dht0 = dht_counts(nodes) if via_shoal else {}
        mark, cpu0 = self.registry.mark(), cpu()
        reg0 = self.reg_ns.sent_bytes()
        sent0 = {n.ns.short_name: n.ns.sent_bytes() for n in nodes}
        if peak:
            peak.start()
        spies = profile(self.args.profile, label, shoals)
        try:
            done = fetch_all(nodes, self.ref, via_shoal, "cri")
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
                spy.wait(timeout=60)
        # Counters first: the metric reads below cross the links too.
        sent = {n.ns.short_name: (n.ns.sent_bytes() - sent0[n.ns.short_name]) / total
                for n in nodes}  # fmt: skip
        reg_link = (self.reg_ns.sent_bytes() - reg0) / total
        if peak:
            peak.stop()
        cpu1 = cpu()
        dht = {k: v - dht0[k] for k, v in dht_counts(nodes).items()} if via_shoal else {}
        log = self.registry.access_log(mark)
        by_ip = {n.ns.ip: n.ns.short_name for n in nodes}
        fetched: dict[str, float] = {}
        for r in log:
            if r.method == "GET" and "/blobs/" in r.path:
                name = by_ip.get(r.remote.rsplit(":", 1)[0], r.remote)
                fetched[name] = fetched.get(name, 0.0) + r.size / total
        phase = Phase(
            label, done[-1], done, sum(fetched.values()), reg_link, fetched,
            sent,
            {n.ns.short_name: (to_peers(n) - peers0[n.ns.short_name]) / total for n in nodes},
            cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], peak.most if peak else 0,
            cpu1[2] - cpu0[2], dht,
            {k: (v[0] - cpu0[3][k][0], v[1] - cpu0[3][k][1]) for k, v in cpu1[3].items()}, idle,
        )  # fmt: skip
        self.report(phase)
        return phase

    def report(self, p: Phase) -> None:
        name, most = p.top()
        spread = " ".join(f"{v:.2f}" for v in sorted(p.sent.values(), reverse=True))
        fetchers = ", ".join(f"{k} {v:.2f}x" for k, v in sorted(p.fetched_by.items()))
        print(
            f"  {p.label}: {p.took:.1f} s (nodes done at {' '.join(f'{t:.1f}' for t in p.done)});"
            f" registry {p.registry:.2f}x (link {p.registry_link:.2f}x; to {fetchers});"
            f" most sent {most:.2f}x by {name} (its shoal to peers "
            f"{p.to_peers.get(name, 0.0):.2f}x); every node sent [{spread}];"
            f" CPU s shoal {p.cpu_shoal:.1f} (routing threads {p.cpu_routing:.1f}),"
            f" containerd {p.cpu_containerd:.1f}"
            + ("; DHT " + ", ".join(f"{k} {v:.0f}" for k, v in p.dht.items()) if p.dht else "")
            + (f"; at most {p.peak_streams} GETs at once" if p.peak_streams else "")
            + (
                f"; idle before: shoals {p.idle[0]:.3f} CPU-s/s (routing {p.idle[1]:.3f})"
                if p.idle[0]
                else ""
            ),
            flush=True,
        )


def profile(where: Path | None, label: str, pids: list[int]) -> list[subprocess.Popen[bytes]]:
    """With --profile: py-spy sampling each shoal while the nodes pull (collapsed stacks per
    process, threads apart, idle frames left out: where the CPU went). It costs CPU itself, so
    a profiled phase's times are not measurements."""
    if where is None or not pids:
        return []
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    where.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")

    def record(pid: int) -> list[str]:
        return [spy, "record", "--pid", str(pid), "--rate", "50", "--threads", "--nonblocking",
                "--format", "raw", "--output", str(where / f"{tag}.{pid}.txt")]  # fmt: skip

    quiet = subprocess.DEVNULL
    return [subprocess.Popen(record(pid), stdout=quiet, stderr=quiet) for pid in pids]


def dht_counts(nodes: list[Node]) -> dict[str, float]:
    """The nodes' routing counters (`shoal_routing_*`), summed: what a rollout asks of the DHT."""
    shoals = [n for n in nodes if n.shoal]
    return {k: sum(n.metric(f"shoal_routing_{k}_total") for n in shoals) for k in DHT_COUNTERS}


def to_peers(node: Node) -> float:
    return node.metric("shoal_bytes_to_peers_total") if node.shoal else 0.0


class Peak:
    """The most GET answers one shoal had under way at once (shoal_inflight_streams, sampled
    every 50 ms): with one node alone, how many blobs its containerd fetches in parallel."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.most = max(self.most, int(self.node.metric("shoal_inflight_streams")))
            except OSError:
                pass


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--mib", type=int, default=56)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rate", default="200mbit", help="every link, both directions")
    parser.add_argument("--designs", default="star,tree", help="comma-separated: star, tree")
    parser.add_argument("--fanout", type=int, default=2, help="tree: --herd-fanout K")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None,
                        help="directory for py-spy samples of every shoal per phase")  # fmt: skip
    node_arguments(parser, "--herd-fanout=3")
    args = parser.parse_args()
    args.designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = set(args.designs) - {"star", "tree"}
    if unknown:
        parser.error(f"unknown designs {sorted(unknown)}")
    return args


def design_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """The `shoal run` arguments of each design asked for."""
    all_ = {"star": ["--herd-fanout", "0"], "tree": ["--herd-fanout", str(args.fanout)]}
    return {d: all_[d] for d in args.designs}


def label(design: str, args: argparse.Namespace) -> str:
    return f"tree k={args.fanout}" if design == "tree" else design


def main() -> int:
    args = parse()
    runtime = choose(args.containerd)
    print(f"containerd {runtime.version} ({runtime.bin_dir})")
    designs = design_args(args)
    base = Path(tempfile.mkdtemp(prefix="shoal-herd-"))
    net = Network("herd").create()
    try:
        reg_ns = net.add("reg")
        registry = Registry(base / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
        image = images.large_image(args.mib, layers=args.layers, seed=15, name="herd")
        ref = images.push(image, registry, "herd/app", "v1")
        bench = Bench(args, net, base, reg_ns, registry, image, ref)
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)
            n = args.nodes
            phases = {
                "floor": bench.phase(f"floor: {n} direct, no limit", n, herd_args=None,
                                     capped=False),
                "one": bench.phase("1 node, capped", 1, herd_args=designs.get("star", []),
                                   capped=True),
            }  # fmt: skip
            if "tree" in designs:
                # One node relaying the image to one other as it arrives: the model's sending
                # cost per byte, at about a tree's per-stream rate (docs/herd.md).
                # Twice, the quieter kept: a 3 s phase on a shared host picks up other
                # processes' noise, which only ever adds CPU.
                pairs = [bench.phase(f"pair {k + 1}/{PAIRS}: 2 nodes, capped", 2,
                                     herd_args=designs["tree"], capped=True)
                         for k in range(PAIRS)]  # fmt: skip
                phases["pair"] = min(pairs, key=lambda p: p.cpu_shoal + p.cpu_containerd)
            for d, extra in designs.items():
                phases[d] = bench.phase(f"{label(d, args)}, {n} nodes, capped", n,
                                        herd_args=extra, capped=True)  # fmt: skip
            bench.results.append(phases)
    finally:
        stop_all()
        net.destroy()
        shutil.rmtree(base, ignore_errors=True)  # GBs of containerd roots
    summary(bench, designs)
    return 0


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def summary(bench: Bench, designs: dict[str, list[str]]) -> None:
    args, runs = bench.args, bench.results
    print(
        f"\n{args.mib} MiB image in {args.layers} layers, {args.nodes} nodes, every link "
        f"{args.rate} both ways (the registry's too), {len(runs)} run(s), pulled by CRI, "
        f"{args.warm_gib:g} GiB warmed before each phase"
        + (f", shoal {' '.join(args.shoal_arg)}" if args.shoal_arg else "")
    )
    peaks = span([r["one"].peak_streams for r in runs], "{:.0f}")
    print(f"containerd max_concurrent_downloads: {bench.concurrency}; "
          f"one node alone had at most {peaks} blob GETs under way at once")  # fmt: skip
    print(f"floor {span([r['floor'].took for r in runs], '{:.1f}')} s, "
          f"1 node {span([r['one'].took for r in runs], '{:.1f}')} s")  # fmt: skip
    print(f"{'design':14} {'time (s)':>10} {'vs 1 node':>10} {'vs floor':>10} "
          f"{'registry/img':>13} {'max sent/img':>13} {'CPU s shoal':>12}")  # fmt: skip
    goals = []
    for d in designs:
        took = [r[d].took for r in runs]
        vs_one = [r[d].took / r["one"].took for r in runs]
        vs_floor = [r[d].took / r["floor"].took for r in runs]
        reg = [r[d].registry for r in runs]
        tops = [r[d].top() for r in runs]
        most = [t[1] for t in tops]
        print(
            f"{label(d, args):14} {span(took, '{:.1f}'):>10} {span(vs_one) + 'x':>10}"
            f" {span(vs_floor) + 'x':>10} {span(reg) + 'x':>13} {span(most) + 'x':>13}"
            f" {span([r[d].cpu_shoal for r in runs], '{:.1f}'):>12}"
            f"   (most sent by {', '.join(t[0] for t in tops)})"
        )
        checks = [
            (f"registry <= {GOAL_REGISTRY}x", max(reg), GOAL_REGISTRY),
            (f"max sent <= {GOAL_SENT}x", max(most), GOAL_SENT),
            (f"time <= {GOAL_FLOOR}x floor", max(vs_floor), GOAL_FLOOR),
        ]
        goals.append(f"  {label(d, args)}: " + "; ".join(
            f"{name}: {v:.2f}x {'met' if v <= goal else 'MISSED'}" for name, v, goal in checks
        ))  # fmt: skip
    print("goals (issue 15) vs measured, worst run:", *goals, sep="\n")
    for i, run in enumerate(runs):
        if {"floor", "one", "star", "tree"} <= run.keys():
            print(f"the model, calibrated by run {i + 1} (docs/herd.md):\n  "
                  + model_command(args, run))  # fmt: skip


def pair_nodes(pair: Phase) -> tuple[float, float, float] | None:
    """The pair per node: (the relay's shoal CPU-s, the receiver's, both containerds'); the
    relay is the node whose shoal sent the image to the other."""
    if len(pair.cpu_by_node) != 2 or not pair.to_peers:
        return None
    relay = max(pair.to_peers, key=lambda n: pair.to_peers[n])
    (other,) = set(pair.cpu_by_node) - {relay}
    ctrd = sum(c for _, c in pair.cpu_by_node.values())
    return pair.cpu_by_node[relay][0], pair.cpu_by_node[other][0], ctrd


def model_command(args: argparse.Namespace, run: dict[str, Phase]) -> str:
    """bench/herd_model.py checking this run's tree and star, its CPU calibrated by the floor,
    1-node and star phases (the star: the bytes all shoals sent to peers, in images)."""
    extra: list[str] = []
    if (args.mib, args.layers) != (56, 4):
        extra += ["--mib", str(args.mib), "--layers", str(args.layers)]
    mbit = re.fullmatch(r"(\d+(?:\.\d+)?)mbit", args.rate)
    if mbit is None or float(mbit[1]) != 200:
        extra += ["--rate-mbit", mbit[1] if mbit else f"<{args.rate} in Mbit/s>"]
    floor, one, star = run["floor"], run["one"], run["star"]
    return _herd_cpu.command(
        nodes=args.nodes,
        fanout=args.fanout,
        floor=(floor.took, floor.cpu_containerd),
        alone=(one.took, one.cpu_shoal),
        star=(star.took, star.cpu_shoal, sum(star.to_peers.values())),
        tree=run["tree"].took,
        pair=(run["pair"].cpu_shoal, sum(run["pair"].to_peers.values())) if "pair" in run else None,
        pair_nodes=pair_nodes(run["pair"]) if "pair" in run else None,
        routing=(star.idle[0], star.idle[1], star.cpu_routing, star.dht["announce_streams"])
        if star.dht
        else None,
        extra=tuple(extra),
    )


if __name__ == "__main__":
    sys.exit(main())
