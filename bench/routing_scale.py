"""Scale bench of shoal's libp2p routing: N node processes on 127.0.0.x, one DHT.

    .venv/bin/python bench/routing_scale.py [--nodes 20] [--keys 2000] [--single 5000]

Phases (each printed as a table row):
  1. every node advertises --keys distinct digests at once: wall time, CPU-seconds (advertising
     nodes and the whole cluster, receivers included);
  2. "fully advertised": a sample (--verify) of all keys looked up from other nodes;
  3. lookup latency, one lookup at a time from random nodes for random keys, p50/p99: as the
     daemon does it (local store first) and forced over the network;
  4. one fresh node advertises --single digests: time and CPU; every key looked up elsewhere;
  5. stock `KadDHT.provide()` on --stock keys from the same node, and the per-key ratio;
  6. RSS per process.
Goals: 5,000 digests in ≤60 s using ≤1 core; lookup p50 ≤20 ms, p99 ≤100 ms; RSS ≤128 MiB.
The machine may be shared: wall-clock numbers suffer, CPU-seconds carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _routing_node import bench_key  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class NodeProc:
    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.id = ""
        self.addrs: list[str] = []
        self._lock = asyncio.Lock()

    @classmethod
    async def spawn(cls, index: int, ip: str, data_dir: str, replication: int) -> NodeProc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "_routing_node.py"),
            "--ip",
            ip,
            "--data-dir",
            data_dir,
            "--replication",
            str(replication),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        node = cls(index, proc)
        up = await node._read(120)
        node.id, node.addrs = up["id"], up["addrs"]
        ID_OF[index] = node.id
        return node

    async def _read(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"node {self.index} exited")
        return json.loads(line)

    async def call(self, timeout: float = 300, **cmd: Any) -> Any:
        async with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            await self.proc.stdin.drain()
            reply = await self._read(timeout)
        if "error" in reply:
            raise RuntimeError(f"node {self.index}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"cmd": "stop"}\n')
            await self.proc.stdin.drain()
            await asyncio.wait_for(self.proc.wait(), 15)
        except Exception:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(name: str, value: str, goal: str = "") -> None:
    print(f"| {name:<58} | {value:>24} | {goal:<22} |", flush=True)


async def wait_tables(nodes: list[NodeProc], want: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        sizes = [
            s["routing_table_peers"]
            for s in await asyncio.gather(*(n.call(cmd="stats") for n in nodes))
        ]
        if min(sizes) >= want or time.monotonic() > deadline:
            return sizes
        await asyncio.sleep(1)


async def lookups(
    nodes: list[NodeProc], owner_of: dict[str, int], keys: list[str], use_local: bool, parallel: int
) -> tuple[int, list[float], float]:
    """Each key looked up from a random node other than its owner; returns found, latencies, CPU."""
    by_node: dict[int, list[str]] = {}
    for key in keys:
        choices = [n.index for n in nodes if n.index != owner_of[key]]
        by_node.setdefault(random.choice(choices), []).append(key)
    index = {n.index: n for n in nodes}

    async def run(i: int, ks: list[str]) -> Any:
        return ks, await index[i].call(
            cmd="lookup", keys=ks, use_local=use_local, parallel=parallel
        )

    found, lat, cpu = 0, [], 0.0
    for ks, reply in await asyncio.gather(*(run(i, ks) for i, ks in by_node.items())):
        cpu += reply["cpu"]
        for key, (peer, seconds) in zip(ks, reply["results"], strict=True):
            lat.append(seconds)
            found += peer == ID_OF[owner_of[key]]
    return found, lat, cpu


ID_OF: dict[int, str] = {}  # node index -> peer ID


async def _one_node_batch(
    nodes: list[NodeProc], owner_of: dict[str, int], keys: list[str], use_local: bool
) -> tuple[int, list[float], float]:
    """10 random keys owned by others, looked up one at a time from one random node."""
    node = random.choice(nodes)
    batch: list[str] = []
    while len(batch) < 10:
        key = random.choice(keys)
        if owner_of[key] != node.index:
            batch.append(key)
    reply = await node.call(cmd="lookup", keys=batch, use_local=use_local, parallel=1)
    found = sum(
        peer == ID_OF[owner_of[k]] for k, (peer, _) in zip(batch, reply["results"], strict=True)
    )
    return found, [s for _, s in reply["results"]], reply["cpu"]


async def bench(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    tmp = tempfile.mkdtemp(prefix="shoal-routing-bench-")
    nodes: list[NodeProc] = []
    t0 = time.monotonic()
    try:
        # Start in small waves: 20 imports of libp2p at once would starve a 2-core machine.
        for wave in range(0, args.nodes, 4):
            nodes += await asyncio.gather(
                *(
                    NodeProc.spawn(i, f"127.0.0.{i + 2}", f"{tmp}/n{i}", args.replication)
                    for i in range(wave, min(wave + 4, args.nodes))
                )
            )
        await asyncio.gather(*(n.call(cmd="connect", addrs=nodes[0].addrs) for n in nodes[1:]))
        sizes = await wait_tables(nodes, min(args.nodes - 1, 20), 90)
        print(
            f"\n{args.nodes} nodes up in {time.monotonic() - t0:.1f}s; routing tables "
            f"min/median/max {min(sizes)}/{statistics.median(sizes):.0f}/{max(sizes)}; "
            f"replication {args.replication}; {os.cpu_count()} CPUs "
            f"(load avg {os.getloadavg()[0]:.1f})\n"
        )
        print(f"| {'measure':<58} | {'value':>24} | {'goal':<22} |")
        print(f"|{'-' * 60}|{'-' * 26}|{'-' * 24}|")

        # 1. everyone advertises at once
        owner_of: dict[str, int] = {}
        for n in nodes:
            for i in range(args.keys):
                owner_of[bench_key(f"n{n.index}", i)] = n.index
        pids = [n.proc.pid for n in nodes]
        cpu0 = sum(proc_cpu(p) for p in pids)
        start = time.perf_counter()
        replies = await asyncio.gather(
            *(n.call(cmd="advertise", prefix=f"n{n.index}", count=args.keys) for n in nodes)
        )
        wall = time.perf_counter() - start
        await asyncio.sleep(args.tick_wait)  # newcomer top-ups from the maintenance tick
        cluster_cpu = sum(proc_cpu(p) for p in pids) - cpu0
        total = args.keys * args.nodes
        row(f"advertise {args.keys} keys on each of {args.nodes} nodes: wall", f"{wall:.2f} s")
        row(
            "  advertise calls' own CPU (sum over nodes)",
            f"{sum(r['cpu'] for r in replies):.2f} CPU-s",
        )
        row("  cluster CPU incl. receivers (sum over processes)", f"{cluster_cpu:.2f} CPU-s")
        row("  cluster CPU per key", f"{cluster_cpu / total * 1000:.3f} ms")

        # 2. fully advertised?
        all_keys = list(owner_of)
        sample = all_keys if args.verify >= len(all_keys) else random.sample(all_keys, args.verify)
        found, lat, _ = await lookups(nodes, owner_of, sample, use_local=False, parallel=2)
        row(
            f"verify: {len(sample)} keys over the network, owner found",
            f"{found}/{len(sample)}",
            "all",
        )

        # 3. latency, one lookup in flight at a time
        for use_local, label in (
            (True, "as the daemon does (local store first)"),
            (False, "over the network (local store skipped)"),
        ):
            found, lat = 0, []
            for _ in range(args.latency // 10):
                got, seconds, _ = await _one_node_batch(nodes, owner_of, all_keys, use_local)
                found += got
                lat += seconds
            row(f"lookup {label}: p50", f"{pct(lat, 50) * 1000:.1f} ms", "≤20 ms")
            row("  p99", f"{pct(lat, 99) * 1000:.1f} ms", "≤100 ms")
            row("  found", f"{found}/{len(lat)}")

        # 4. a fresh node advertises many digests
        single = await NodeProc.spawn(
            args.nodes, f"127.0.0.{args.nodes + 2}", f"{tmp}/single", args.replication
        )
        nodes.append(single)
        await single.call(cmd="connect", addrs=nodes[0].addrs)
        await wait_tables([single], min(args.nodes, 20), 60)
        await asyncio.sleep(args.tick_wait)
        cpu_single0, cpu_all0 = proc_cpu(single.proc.pid), sum(proc_cpu(n.proc.pid) for n in nodes)
        reply = await single.call(cmd="advertise", prefix="single", count=args.single)
        single_cpu = proc_cpu(single.proc.pid) - cpu_single0
        all_cpu = sum(proc_cpu(n.proc.pid) for n in nodes) - cpu_all0
        row(f"one node advertises {args.single} digests: wall", f"{reply['wall']:.2f} s", "≤60 s")
        row(
            "  its CPU (process)",
            f"{single_cpu:.2f} CPU-s ({single_cpu / reply['wall']:.2f} core)",
            "≤1 core",
        )
        row("  cluster CPU incl. receivers", f"{all_cpu:.2f} CPU-s")
        bulk_per_key = single_cpu / args.single
        single_keys = [bench_key("single", i) for i in range(args.single)]
        for key in single_keys:
            owner_of[key] = single.index
        found, _, _ = await lookups(nodes[:-1], owner_of, single_keys, use_local=True, parallel=2)
        row(
            f"  verify: all {args.single} looked up from other nodes",
            f"{found}/{args.single}",
            "all",
        )

        # 5. stock provide() for reference
        stock_keys = [bench_key("stock", i) for i in range(args.stock)]
        cpu_before = proc_cpu(single.proc.pid)
        reply = await single.call(cmd="provide_stock", keys=stock_keys, timeout=600)
        stock_cpu = proc_cpu(single.proc.pid) - cpu_before
        row(
            f"stock provide() x{args.stock}: wall per key",
            f"{reply['wall'] / args.stock * 1000:.0f} ms",
        )
        row("  CPU per key (process)", f"{stock_cpu / args.stock * 1000:.1f} ms")
        row("  bulk announce CPU per key (phase 4)", f"{bulk_per_key * 1000:.2f} ms")
        row("  ratio stock / bulk (CPU per key)", f"{stock_cpu / args.stock / bulk_per_key:.0f}x")

        # 6. memory
        rss = [proc_rss_mib(n.proc.pid) for n in nodes]
        row(
            "RSS per process: min / median / max",
            f"{min(rss):.0f} / {statistics.median(rss):.0f} / {max(rss):.0f} MiB",
            "≤128 MiB",
        )
        stats = await asyncio.gather(*(n.call(cmd="stats") for n in nodes))
        records = [s["stored_records"] for s in stats]
        row(
            "provider records stored per node: median / max",
            f"{statistics.median(records):.0f} / {max(records)}",
        )
        failures = sum(s["announce_failures"] for s in stats)
        qfail = sum(s["lookup_query_failures"] for s in stats)
        row("announce stream failures / lookup query failures", f"{failures} / {qfail}")
        if args.verbose:
            for n, s in zip(nodes, stats, strict=True):
                print(n.index, {k: v for k, v in s.items() if v})
        print(f"\ntotal bench time {time.monotonic() - t0:.0f} s")
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)
        if args.keep:
            print(f"data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--keys", type=int, default=2000, help="keys advertised by every node")
    ap.add_argument("--single", type=int, default=5000, help="digests advertised by one node")
    ap.add_argument("--verify", type=int, default=4000, help="keys looked up to verify phase 1")
    ap.add_argument("--latency", type=int, default=500, help="lookups for the latency figures")
    ap.add_argument("--stock", type=int, default=5, help="keys announced with stock provide()")
    ap.add_argument("--replication", type=int, default=20)
    ap.add_argument("--tick-wait", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="print every node's counters")
    ap.add_argument("--keep", action="store_true", help="keep the data directory (node logs)")
    asyncio.run(bench(ap.parse_args()))


if __name__ == "__main__":
    main()
