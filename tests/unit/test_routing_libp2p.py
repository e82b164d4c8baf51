"""Libp2pRouter on real libp2p hosts (loopback, one process or several): what the contract
test does not cover: identity, addresses, record lifetime, compatibility, failures, noise."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from shoal.routing import RoutingOptions
from shoal.routing.keys import key_multihash
from shoal.routing.options import read_psk
from tests.unit.libp2p_nodes import (
    REGISTRY_PORT,
    TEST_OPTIONS,
    found,
    libp2p_cluster,
    libp2p_router,
    stop_all,
    wait_for,
)

NODE_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "_routing_node.py"


async def test_restart_keeps_the_peer_id(tmp_path: Path) -> None:
    a, b = await libp2p_cluster(tmp_path, 2)
    try:
        first_id = b.node_info().id
        await b.stop()
        again = libp2p_router(tmp_path / "n1", "127.0.0.3")
        await again.start()
        try:
            assert again.node_info().id == first_id
            assert await again.connect(a.node_info().addrs) == 1
            await again.advertise(["sha256:" + "7" * 64])
            assert [p.id for p in await found(a, "sha256:" + "7" * 64)] == [first_id]
        finally:
            await again.stop()
    finally:
        await a.stop()


async def test_announces_the_configured_address_never_0000(tmp_path: Path) -> None:
    a = libp2p_router(tmp_path / "a", "127.0.0.2")
    b = libp2p_router(tmp_path / "b", "0.0.0.0", p2p_announce="127.0.0.9")
    await asyncio.gather(a.start(), b.start())
    try:
        assert all(addr.startswith("/ip4/127.0.0.9/tcp/") for addr in b.node_info().addrs)
        assert await a.connect(b.node_info().addrs) == 1
        await b.advertise(["sha256:" + "8" * 64])
        peers = await found(a, "sha256:" + "8" * 64)
        assert [p.address for p in peers] == [f"127.0.0.9:{REGISTRY_PORT}"]
    finally:
        await stop_all([a, b])


async def test_bulk_announced_records_answer_stock_get_providers(tmp_path: Path) -> None:
    a, b, c = await libp2p_cluster(tmp_path, 3)
    try:
        keys = [f"sha256:{i:064x}" for i in range(300)]
        await a.advertise(keys)
        node_b, node_c = b._node, c._node

        async def stock_query() -> list[str]:
            # py-libp2p's own client, as any Kademlia peer would ask.
            out = []
            for key in keys[:20]:
                (
                    providers,
                    _,
                ) = await node_c.dht.provider_store._get_providers_from_peer_with_closers(
                    node_b.peer_id, key_multihash(key)
                )
                out += [str(p.peer_id) for p in providers]
            return out

        assert await c._bridge().submit(stock_query) == [a.node_info().id] * 20
    finally:
        await stop_all([a, b, c])


async def test_a_newcomer_gets_its_share_of_existing_keys(tmp_path: Path) -> None:
    a, b = await libp2p_cluster(tmp_path, 2)
    c = libp2p_router(tmp_path / "c", "127.0.0.4")
    await c.start()
    try:
        keys = [f"registry.example/app:{i}" for i in range(200)]
        await a.advertise(keys)
        assert await c.connect(b.node_info().addrs) == 1
        # With fewer than `replication` nodes every node holds every record: C's own store.
        await wait_for(lambda: c.stats()["stored_records"] >= 200)
        assert c.stats()["lookup_queries"] == 0
        assert [p.id for p in await found(c, keys[123])] == [a.node_info().id]
        assert c.stats()["lookup_local_hits"] == 1
    finally:
        await stop_all([a, b, c])


async def test_keys_advertised_together_go_out_as_one_message_per_peer(tmp_path: Path) -> None:
    # A pull starts its blobs within milliseconds of each other; each is advertised on its own
    # call. They share one announcement, so every peer handles one message, not one per blob.
    a, b, c = await libp2p_cluster(tmp_path, 3)
    try:
        before = a.stats()["announce_streams"]
        keys = [f"sha256:{i:064x}" for i in range(6)]
        await asyncio.gather(*(a.advertise([k]) for k in keys))
        assert a.stats()["announce_streams"] - before == 2  # b and c, once each
        for key in keys:
            assert [p.id for p in await found(b, key)] == [a.node_info().id]
            assert [p.id for p in await found(c, key)] == [a.node_info().id]
    finally:
        await stop_all([a, b, c])


async def test_records_live_while_reannounced_and_expire_after(tmp_path: Path) -> None:
    short = dataclasses_replace(TEST_OPTIONS, record_ttl=1.5, reannounce_interval=0.5)
    silent = dataclasses_replace(short, reannounce_interval=3600)
    a = libp2p_router(tmp_path / "a", "127.0.0.2", short)
    b = libp2p_router(tmp_path / "b", "127.0.0.3", silent)
    c = libp2p_router(tmp_path / "c", "127.0.0.4", short)
    await asyncio.gather(a.start(), b.start(), c.start())
    try:
        for r in (b, c):
            assert await r.connect(a.node_info().addrs) == 1
        await a.advertise(["sha256:" + "a" * 64])
        await b.advertise(["sha256:" + "b" * 64])
        assert await found(c, "sha256:" + "b" * 64)
        await asyncio.sleep(3.0)
        assert [p.id for p in await found(c, "sha256:" + "a" * 64)] == [a.node_info().id]
        assert await found(c, "sha256:" + "b" * 64) == []  # expired everywhere, never re-sent
    finally:
        await stop_all([a, b, c])


def dataclasses_replace(options: RoutingOptions, **changes: Any) -> RoutingOptions:
    import dataclasses

    return dataclasses.replace(options, **changes)


async def test_cancelled_lookups_leave_connections_usable(tmp_path: Path) -> None:
    a, b, c = await libp2p_cluster(tmp_path, 3)
    try:
        keys = [f"sha256:{i:064x}" for i in range(100)]
        await a.advertise(keys)

        async def cut_short(key: str) -> None:
            try:
                await asyncio.wait_for(found_net(c, key), random.uniform(0.0, 0.02))
            except TimeoutError:
                pass

        random.seed(7)
        await asyncio.gather(*(cut_short(k) for k in keys * 2))
        await asyncio.sleep(0.5)
        for key in keys:
            assert [p.id for p in await found_net(c, key)] == [a.node_info().id]
        stats = c.stats()
        assert stats["lookup_query_failures"] == 0 and stats["exchange_timeouts"] == 0
    finally:
        await stop_all([a, b, c])


async def found_net(router: Any, key: str, limit: int = 1) -> list[Any]:
    """A lookup that skips the local store, so it always goes over the network."""
    return [p async for p in router._lookup(key, limit, use_local=False)]


async def test_private_network_key_keeps_outsiders_out(tmp_path: Path) -> None:
    key_a = tmp_path / "cluster.key"
    key_a.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 32 + "\n")
    key_b = tmp_path / "other.key"
    key_b.write_text("cd" * 32)
    assert read_psk(str(key_a)) != read_psk(str(key_b))
    a = libp2p_router(tmp_path / "a", "127.0.0.2", psk_file=str(key_a))
    b = libp2p_router(tmp_path / "b", "127.0.0.3", psk_file=str(key_a))
    outsider = libp2p_router(tmp_path / "c", "127.0.0.4", psk_file=str(key_b))
    plain = libp2p_router(tmp_path / "d", "127.0.0.5")
    await asyncio.gather(a.start(), b.start(), outsider.start(), plain.start())
    try:
        assert await b.connect(a.node_info().addrs) == 1
        refused = await asyncio.gather(
            outsider.connect(a.node_info().addrs, timeout=1.0),
            plain.connect(a.node_info().addrs, timeout=1.0),
        )
        assert refused == [0, 0]
        assert not outsider.ready() and not plain.ready()
    finally:
        await stop_all([a, b, outsider, plain])


async def test_idle_inbound_streams_are_reset_after_the_read_timeout(tmp_path: Path) -> None:
    options = dataclasses_replace(TEST_OPTIONS, inbound_read_timeout=0.5)
    a, b = await libp2p_cluster(tmp_path, 2, options)
    try:
        node_a, node_b = a._node, b._node

        async def idle_stream(protocol: str) -> float:
            from libp2p.custom_types import TProtocol

            stream = await node_b.host.new_stream(node_a.peer_id, [TProtocol(protocol)])
            start = trio.current_time()
            with trio.fail_after(5):
                try:
                    while await stream.read(1):
                        pass
                except Exception:
                    pass  # reset or end of stream: the server let go
            return trio.current_time() - start

        for protocol in (options.protocol_id, "/shoal/announce/1.0.0"):
            held = await b._bridge().submit(idle_stream, protocol)
            assert 0.4 < held < 2.0
    finally:
        await stop_all([a, b])


async def test_libp2p_logs_go_through_the_app_and_requests_are_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root_handlers = list(logging.getLogger().handlers)
    a, b = await libp2p_cluster(tmp_path, 2)
    try:
        assert logging.getLogger().handlers == root_handlers
        assert logging.getLogger("libp2p").propagate
        with caplog.at_level(logging.DEBUG, logger="libp2p"):
            await a.advertise(["sha256:" + "c" * 64])
            for _ in range(20):
                await found_net(b, "sha256:" + "c" * 64)
        assert [r for r in caplog.records if r.name.startswith("libp2p") and r.levelno >= 30] == []
        logging.getLogger("libp2p.some.module").error("reaches the app")
        assert "reaches the app" in caplog.text
    finally:
        await stop_all([a, b])


class NodeProcess:
    """bench/_routing_node.py in its own process: a peer we can freeze (SIGSTOP) or kill."""

    def __init__(self, data_dir: Path, ip: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(NODE_SCRIPT), "--ip", ip, "--data-dir", str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        up = json.loads(self._readline())
        self.id, self.addrs = up["id"], up["addrs"]

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("node process exited")
        return line

    def call(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._readline())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


@pytest.mark.slow
async def test_a_hung_or_dead_peer_costs_lookups_at_most_a_second(tmp_path: Path) -> None:
    routers = await libp2p_cluster(tmp_path, 3)
    a, b, _ = routers
    node = await asyncio.to_thread(NodeProcess, tmp_path / "proc", "127.0.0.9")
    try:
        reply = await asyncio.to_thread(node.call, cmd="connect", addrs=a.node_info().addrs)
        assert reply == {"connected": 1}
        await wait_for(lambda: all(len(r.members()) == 3 for r in routers))
        keys = [f"sha256:{i:064x}" for i in range(60)]
        await a.advertise(keys)

        async def timed_lookups(batch: list[str]) -> list[float]:
            times = []
            for key in batch:
                start = time.monotonic()
                assert [p.id for p in await found_net(b, key)] == [a.node_info().id]
                times.append(time.monotonic() - start)
            return times

        assert max(await timed_lookups(keys[:10])) < 0.5  # all peers healthy

        os.kill(node.proc.pid, signal.SIGSTOP)  # hung: TCP still accepts, nothing answers
        hung = await timed_lookups(keys[10:35])
        assert max(hung) < 1.5, hung
        assert statistics.median(hung) < 0.3, hung
        await asyncio.sleep(1.2)  # abandoned queries to the frozen peer hit their deadline
        assert b.stats()["exchange_timeouts"] >= 1  # it was asked, and did not hold us up

        node.kill()  # dead: connections refused
        dead = await timed_lookups(keys[35:])
        assert max(dead) < 1.5, dead
        assert statistics.median(dead) < 0.3, dead
    finally:
        await asyncio.to_thread(node.kill)
        await stop_all(routers)


async def test_more_nodes_than_replicas_records_land_on_the_closest_and_are_found(
    tmp_path: Path,
) -> None:
    options = dataclasses_replace(TEST_OPTIONS, replication=2, announce_region_walks="always")
    routers = await libp2p_cluster(tmp_path, 6, options)
    try:
        await wait_for(lambda: all(len(r.members()) == 5 for r in routers))
        keys = {i: [f"sha256:{i:02x}{j:062x}" for j in range(40)] for i in range(6)}
        await asyncio.gather(*(r.advertise(keys[i]) for i, r in enumerate(routers)))
        await asyncio.sleep(1.0)  # a few ticks: nothing more should be sent
        # Each key went to its 2 closest nodes (one of them possibly the owner), not everywhere.
        received = sum(r.stats()["records_received"] for r in routers)
        assert 6 * 40 <= received <= 6 * 40 * 2
        assert all(r._node.announcer.regions for r in routers)  # keys were placed by region walks
        misses = 0
        for i, r in enumerate(routers):
            for j, owner_keys in keys.items():
                if i == j:
                    continue
                for key in owner_keys[:10]:
                    ids = [p.id for p in await found_net(r, key)]
                    misses += ids != [routers[j].node_info().id]
        assert misses == 0
    finally:
        await stop_all(routers)


@pytest.mark.parametrize("replication", [20, 5])
async def test_a_miss_asks_two_peers_when_the_table_holds_the_whole_network(
    tmp_path: Path, replication: int
) -> None:
    # No hedging: the count below must not depend on how busy the machine is.
    options = dataclasses_replace(
        TEST_OPTIONS, replication=replication, lookup_hedge_delay=5.0, lookup_peer_timeout=5.0
    )
    routers = await libp2p_cluster(tmp_path, 6, options)
    try:
        await wait_for(lambda: all(len(r.members()) == 5 for r in routers))
        a, holder = routers[0], routers[4]
        before = a.stats()["lookup_queries"]
        assert await found_net(a, "sha256:" + "ab" * 32) == []
        asked = a.stats()["lookup_queries"] - before
        if replication == 20:  # 6 nodes < 20: every node stores every record
            assert asked == 2
        else:  # 5 peers known, not fewer than `replication`: the lookup walks as Kademlia does
            assert asked >= options.lookup_quiet_answers
        key = "sha256:" + "cd" * 32
        await holder.advertise([key])
        await asyncio.sleep(0.5)
        assert [p.id for p in await found_net(a, key)] == [holder.node_info().id]
    finally:
        await stop_all(routers)


async def test_a_settled_table_answers_lookups_from_the_store_and_a_newcomer_unsettles_it(
    tmp_path: Path,
) -> None:
    # A rollout's first lookups are all misses: on a settled cluster they must not cost the
    # network anything, yet a key a peer advertised is still found.
    options = dataclasses_replace(
        TEST_OPTIONS, lookup_settled_after=2.0, lookup_hedge_delay=5.0, lookup_peer_timeout=5.0
    )
    routers = await libp2p_cluster(tmp_path, 4, options)
    newcomer = None
    try:
        await wait_for(lambda: all(len(r.members()) == 3 for r in routers))
        a, holder = routers[0], routers[3]
        await wait_for(lambda: a.stats()["table_settled"] == 1)
        before = a.stats()["lookup_queries"]
        assert await found(a, "sha256:" + "ab" * 32) == []
        key = "sha256:" + "cd" * 32
        await holder.advertise([key])
        await wait_for(lambda: a.stats()["stored_records"] >= 1)
        assert [p.id for p in await found(a, key)] == [holder.node_info().id]
        assert a.stats()["lookup_queries"] == before  # nobody was asked
        assert a.stats()["lookup_store_only"] >= 2
        # A node joins: until the table has held still again, misses walk as before (the
        # newcomer may hold records this node never got).
        newcomer = libp2p_router(tmp_path / "late", "127.0.0.9", options)
        await newcomer.start()
        assert await newcomer.connect(a.node_info().addrs)
        await wait_for(lambda: len(a.members()) == 4 and a.stats()["table_settled"] == 0)
        before = a.stats()["lookup_queries"]
        assert await found(a, "sha256:" + "ef" * 32) == []
        assert a.stats()["lookup_queries"] > before
    finally:
        await stop_all(routers + ([newcomer] if newcomer else []))


async def test_refresh_walks_only_when_a_peer_could_be_missing(tmp_path: Path) -> None:
    routers = await libp2p_cluster(tmp_path, 4)
    try:
        await wait_for(lambda: all(len(r.members()) == 3 for r in routers))
        a, c = routers[0], routers[2]
        node = a._node

        async def probe() -> bool:
            return await node.membership._may_find_more()

        # Everyone knows everyone: asking two peers over pooled streams shows nobody is missing.
        assert not await a._bridge().submit(probe)
        # A peer that fell out of the table is named by the peers asked: the walk runs, and
        # finds it again.
        missing = next(
            p for p in node.dht.routing_table.get_peer_ids() if str(p) == c.node_info().id
        )

        async def forget_and_refresh() -> tuple[bool, bool]:
            node.dht.routing_table.remove_peer(missing)
            wanted = await node.membership._may_find_more()
            await node.dht.peer_routing.find_closest_peers_network(node.peer_id.to_bytes())
            return wanted, node.dht.routing_table.peer_in_table(missing)

        assert await a._bridge().submit(forget_and_refresh) == (True, True)
    finally:
        await stop_all(routers)


async def test_calls_after_stop_are_ignored_and_stop_is_idempotent(tmp_path: Path) -> None:
    a, b = await libp2p_cluster(tmp_path, 2)
    await a.advertise(["sha256:" + "d" * 64])
    start = time.monotonic()
    await stop_all([a, b])
    assert time.monotonic() - start < 5
    await a.advertise(["sha256:" + "e" * 64])
    await a.withdraw(["sha256:" + "d" * 64])
    assert await found(a, "sha256:" + "d" * 64) == []
    assert not a.ready()
    await a.stop()
