"""One shoal routing node for bench/routing_scale.py, driven by JSON lines on stdin/stdout.

Runs a real `Libp2pRouter` (trio thread + asyncio bridge) with an in-memory provider store.
Prints `{"event": "up", "id": …, "addrs": […]}` once listening, then answers one JSON line per
command: connect, advertise, lookup, provide_stock, stats, stop.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

from shoal.routing.keys import key_cid
from shoal.routing.libp2p.router import Libp2pRouter
from shoal.routing.options import RoutingOptions


def bench_key(prefix: str, i: int) -> str:
    return "sha256:" + hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest()


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Node:
    def __init__(self, router: Libp2pRouter) -> None:
        self.router = router

    async def connect(self, addrs: list[str]) -> dict[str, Any]:
        return {"connected": await self.router.connect(addrs)}

    async def advertise(self, prefix: str, count: int) -> dict[str, Any]:
        keys = [bench_key(prefix, i) for i in range(count)]
        cpu, wall = time.process_time(), time.perf_counter()
        await self.router.advertise(keys)
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    async def lookup(self, keys: list[str], use_local: bool, parallel: int) -> dict[str, Any]:
        sem = asyncio.Semaphore(parallel)
        results: list[Any] = [None] * len(keys)

        async def one(i: int, key: str) -> None:
            async with sem:
                start = time.perf_counter()
                found = None
                async for peer in self.router._lookup(key, 1, use_local=use_local):
                    found = peer.id
                results[i] = [found, time.perf_counter() - start]

        cpu = time.process_time()
        await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
        return {"results": results, "cpu": time.process_time() - cpu}

    async def provide_stock(self, keys: list[str]) -> dict[str, Any]:
        """Stock `KadDHT.provide()` one key at a time, for reference."""
        node = self.router._node
        bridge = self.router._bridge()
        cpu, wall = time.process_time(), time.perf_counter()
        ok = 0
        for key in keys:
            ok += bool(await bridge.submit(node.dht.provide, key_cid(key)))
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "ok": ok}

    async def stats(self) -> dict[str, Any]:
        return {**self.router.stats(), "rss_mib": rss_mib(), "cpu": time.process_time()}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ip", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--replication", type=int, default=RoutingOptions.replication)
    args = ap.parse_args()
    # SHOAL_BENCH_DEBUG=1: this node's shoal.routing debug log in <data-dir>/node.log.
    debug = os.environ.get("SHOAL_BENCH_DEBUG") == "1"
    os.makedirs(args.data_dir, exist_ok=True)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s node %(name)s %(levelname)s %(message)s",
        **({"filename": os.path.join(args.data_dir, "node.log")} if debug else {}),
    )
    if debug:
        logging.getLogger("shoal.routing").setLevel(logging.DEBUG)
    options = RoutingOptions(replication=args.replication)
    router = Libp2pRouter(
        data_dir=args.data_dir,
        registry_port=30020,
        p2p_listen=f"{args.ip}:{args.port}",
        options=options,
    )
    await router.start()
    node = Node(router)
    out = sys.stdout
    info = router.node_info()
    out.write(json.dumps({"event": "up", "id": info.id, "addrs": list(info.addrs)}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            name = cmd.pop("cmd")
            if name == "stop":
                break
            try:
                reply = await getattr(node, name)(**cmd)
            except Exception as exc:
                reply = {"error": repr(exc)}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        await router.stop()
        out.write(json.dumps({"event": "stopped"}) + "\n")
        out.flush()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
