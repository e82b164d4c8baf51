"""A rollout: 8 nodes fetch one image at the same moment from a registry behind a 200 Mbit/s link.

    sudo .venv/bin/python bench/rollout.py [--mib 128] [--nodes 8] [--rate 200mbit] [--client cri]
        [--peer-transfer relay] [--warm-gib 4] [--shoal-arg=--ordered-streams=0 ...]
        [--containerd 2.3.7]      (or SHOAL_CONTAINERD=<version>; see tests/harness/runtime.py)

Four runs in one go, each on fresh containerd stores, printed side by side:
- direct:       every node fetches straight from the registry (no shoal);
- shoal, 1:     one node alone through its shoal (the reference time);
- shoal, N:     all nodes at once, each through its own shoal;
- direct, no limit: every node straight from the registry with the link unshaped: the
                fastest N simultaneous pulls can be on this host (its CPU is the limit).
Each node is a network namespace with its own containerd and shoal (the shoals' routing tables
settled before the pull, as on a cluster that has run a while); the registry has a
namespace of its own whose link is shaped with tbf. Before each run, `--warm-gib` GiB of memory
are written and freed: this VM hands freed memory back to its host after some seconds, and the
first write to such a page costs several times a normal one (README, "The rollout bench"). 8
nodes write ~2 GiB of content and snapshots within seconds; unwarmed, that cost lands in the
8-node runs only, since one node alone waits on the link, not the CPU. 0 turns this off.
Nodes pull as the kubelet does, through CRI PullImage: containerd fetches and unpacks in the
daemon (`--client ctr` uses `ctr content fetch` instead, where the ctr process fetches and
writes over gRPC, without unpacking). All simulated nodes share this host's 2 cores, so the
CPU each part used is printed too.
Goals (issue 4): shoal N <= 1.5x shoal 1; registry bytes <= 1.1x.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._measure import cpu_seconds, node_arguments, warm_memory
from tests.harness import images
from tests.harness.cluster import Cluster, Node
from tests.harness.cri import cri_pull
from tests.harness.netns import Network
from tests.harness.procs import HarnessError, stop_all
from tests.harness.registry import Registry
from tests.harness.runtime import choose


def fetch_all(nodes: list[Node], ref: str, via_shoal: bool, client: str) -> list[float]:
    """Seconds until each node held the image, in finishing order; raises if any pull failed."""
    errors: list[str] = []
    done: list[float] = []

    def one(node: Node) -> None:
        try:
            pull(node)
        finally:
            done.append(time.monotonic() - start)

    def pull(node: Node) -> None:
        if client == "cri":
            try:
                cri_pull(node.containerd.socket, ref)
            except HarnessError as exc:
                errors.append(f"{node.ns.short_name}: {exc}")
            return
        args = ["content", "fetch"]
        args += ["--hosts-dir", str(node.containerd.hosts_dir)] if via_shoal else ["--plain-http"]
        proc = node.containerd.ctr(*args, ref, check=False, timeout=900)
        if proc.returncode != 0:
            errors.append(f"{node.ns.short_name}: {proc.stderr.strip()[-300:]}")

    threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return sorted(done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument(
        "--client", choices=("cri", "ctr"), default="cri",
        help="cri: the kubelet's PullImage (containerd fetches and unpacks); "
        "ctr: `ctr content fetch` (the ctr process fetches, no unpack)",
    )  # fmt: skip
    parser.add_argument("--peer-transfer", choices=("relay", "redirect"), default="relay")
    node_arguments(parser, "--ordered-streams=0")
    args = parser.parse_args()
    runtime = choose(args.containerd)
    print(f"containerd {runtime.version} ({runtime.bin_dir})")

    base = Path(tempfile.mkdtemp(prefix="shoal-rollout-"))
    net = Network("rollout").create()
    rows = []
    try:
        reg_ns = net.add("reg")
        registry = Registry(base / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
        image = images.large_image(args.mib, layers=4, seed=5, name="rollout")
        ref = images.push(image, registry, "rollout/app", "v1")
        reg_ns.limit(args.rate)
        listed = ["--mirror-registries", registry.host, "--upstream-insecure", registry.host,
                  "--peer-transfer", args.peer_transfer, *args.shoal_arg]  # fmt: skip
        for n, (label, count, via_shoal, limited) in enumerate((
            (f"direct, {args.nodes} nodes", args.nodes, False, True),
            ("shoal, 1 node", 1, True, True),
            (f"shoal, {args.nodes} nodes", args.nodes, True, True),
            # What this host allows at best: the same pulls with no network limit at all.
            (f"direct, {args.nodes}, no limit", args.nodes, False, False),
        )):  # fmt: skip
            if not limited:
                reg_ns.unlimit()
            cluster = Cluster(net, base / f"run{n}", registry, shoal_args=listed)
            for i in range(count):
                cluster.add_node(f"r{n}-{i}")
            if not via_shoal:
                for node in cluster.nodes:  # the registry only, no mirror
                    node.containerd.write_hosts_toml(registry.host)
            else:
                for node in cluster.nodes:
                    cluster.start_shoal(node)
                cluster.wait_settled()  # as a cluster that has run a while

            def cpu(nodes: list[Node] = cluster.nodes) -> tuple[float, float]:
                shoal = sum(
                    cpu_seconds(n.shoal.proc.pid) for n in nodes if n.shoal and n.shoal.proc
                )
                ctrd = sum(cpu_seconds(n.containerd.proc.pid) for n in nodes if n.containerd.proc)
                return shoal, ctrd

            clients = resource.getrusage(resource.RUSAGE_CHILDREN)
            warm_memory(args.warm_gib)
            mark, before = registry.mark(), cpu()
            done = fetch_all(cluster.nodes, ref, via_shoal, args.client)
            took = done[-1]
            sent = registry.bytes_sent(since=mark, blobs_only=True)
            after = cpu()
            ctr = resource.getrusage(resource.RUSAGE_CHILDREN)
            ctr_cpu = ctr.ru_utime + ctr.ru_stime - clients.ru_utime - clients.ru_stime
            used = (after[0] - before[0], after[1] - before[1], ctr_cpu)
            rows.append((label, took, sent / image.total_size, used))
            print(
                f"  {label}: {took:.1f} s, registry sent {sent / image.total_size:.2f}x, "
                f"CPU s: shoal {used[0]:.1f}, containerd {used[1]:.1f}; nodes done at "
                + " ".join(f"{t:.1f}" for t in done),
                flush=True,
            )
            for node in cluster.nodes:
                node.ns.destroy()  # stops the node's containerd and shoal too
            shutil.rmtree(cluster.base, ignore_errors=True)
    finally:
        stop_all()
        net.destroy()
        shutil.rmtree(base, ignore_errors=True)  # GBs of containerd roots

    ref_time = rows[1][1]
    print(f"\n{args.mib} MiB image in 4 layers, registry link {args.rate}, {args.nodes} nodes, "
          f"pulled by {args.client}, peer transfer {args.peer_transfer}, "
          f"{args.warm_gib:g} GiB of memory warmed before each run"
          + (f", shoal {' '.join(args.shoal_arg)}" if args.shoal_arg else ""))  # fmt: skip
    ctr = args.client == "ctr"  # with CRI, containerd does the client's work itself
    print(f"{'run':22} {'time (s)':>9} {'vs shoal 1':>11} {'registry bytes / image':>24}"
          f" {'CPU s: shoal':>13} {'containerd':>11}" + (" ctr" if ctr else ""))  # fmt: skip
    for label, took, ratio, used in rows:
        print(f"{label:22} {took:9.1f} {took / ref_time:10.2f}x {ratio:23.2f}x"
              f" {used[0]:13.1f} {used[1]:11.1f}" + (f" {used[2]:.1f}" if ctr else ""))  # fmt: skip
    floor = rows[3][1]
    print(
        f"(this host has {os.cpu_count()} cores for all simulated nodes: "
        f"{os.cpu_count() * rows[2][1]:.0f} CPU-seconds in the wall time of shoal, "
        f"{args.nodes} nodes;\n the last row is the floor {args.nodes} simultaneous pulls have "
        f"here: shoal, {args.nodes} nodes took {rows[2][1] / floor:.2f}x that floor)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
