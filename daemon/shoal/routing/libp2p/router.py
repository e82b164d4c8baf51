"""`Libp2pRouter`: the asyncio `Router` backed by py-libp2p's Kademlia DHT in a trio thread."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from shoal.routing.base import NodeInfo, Peer
from shoal.routing.bootstrap import Discovery
from shoal.routing.bridge import TrioThread
from shoal.routing.keys import key_multihash
from shoal.routing.options import (
    RoutingOptions,
    http_hostport,
    read_psk,
    resolve_p2p_addresses,
)

log = logging.getLogger("shoal.routing.p2p")  # its name before the move, kept for log readers

IDENTITY_FILE = "identity.key"


def load_or_create_identity(path: Path) -> Any:
    """The Ed25519 key pair in `path`, created (atomically, mode 0600) if missing or unreadable."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.identity_utils import load_identity, save_identity

    if path.exists():
        try:
            return load_identity(path)
        except ValueError as exc:
            log.error("identity %s is unreadable (%s); creating a new peer ID", path, exc)
    key_pair = create_new_key_pair()
    tmp = path.with_name(path.name + ".tmp")
    save_identity(key_pair, tmp)
    os.replace(tmp, path)
    return key_pair


_DONE = object()


class Libp2pRouter:
    """See `shoal.routing.libp2p.node` for the protocol details; this class only bridges to
    asyncio. Making one checks that py-libp2p has what shoal patches (`internals.check`)."""

    def __init__(
        self,
        *,
        data_dir: str,
        registry_port: int,
        p2p_listen: str = "0.0.0.0:30022",
        p2p_announce: str = "",
        psk_file: str = "",
        psk: str | None = None,
        discovery: Discovery | None = None,
        ready_alone: bool = False,
        options: RoutingOptions | None = None,
    ) -> None:
        from shoal.routing.libp2p.internals import check

        check()  # a libp2p without what shoal patches fails here, saying what it lacks
        self.options = options or RoutingOptions()
        self._data_dir = Path(data_dir)
        self._registry_port = registry_port
        self._p2p_listen = p2p_listen
        self._p2p_announce = p2p_announce
        self._psk_file = psk_file
        self._psk = psk  # used when no psk_file is given
        self._discovery = discovery
        self._ready_alone = ready_alone
        self._trio: TrioThread | None = None
        self._node: Any = None
        self._bootstrap_task: asyncio.Task[None] | None = None
        self._info = NodeInfo("")
        self._serving = False  # start() finished: lookups may run

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._trio is not None:
            raise RuntimeError("router already started")
        # Imports libp2p (~80 MB, ~0.6 s).
        from shoal.routing.libp2p.host import Host
        from shoal.routing.libp2p.node import P2PNode

        listen_host, listen_port, announce_host, announce_port = resolve_p2p_addresses(
            self._p2p_listen, self._p2p_announce
        )
        self._data_dir.mkdir(parents=True, exist_ok=True)
        key_pair = await asyncio.to_thread(load_or_create_identity, self._data_dir / IDENTITY_FILE)
        host = Host(
            key_pair,
            listen_host,
            listen_port,
            announce_host,
            announce_port,
            self.options,
            psk=read_psk(self._psk_file) if self._psk_file else self._psk,
        )
        self._node = P2PNode(host)
        self._trio = TrioThread()
        await asyncio.to_thread(self._trio.start)
        try:
            await self._trio.start_service(self._node.serve)
        except BaseException:
            await asyncio.to_thread(self._trio.stop)
            self._trio = None
            raise
        self._info = NodeInfo(str(self._node.peer_id), tuple(self._node.listen_addrs()))
        self._serving = True
        log.info("libp2p routing up as %s at %s", self._info.id, ", ".join(self._info.addrs))
        if self._discovery is not None:
            self._bootstrap_task = asyncio.create_task(self._bootstrap_loop(), name="p2p-bootstrap")

    async def stop(self) -> None:
        trio_thread, self._trio = self._trio, None
        self._serving = False
        if trio_thread is None:
            return
        if self._bootstrap_task is not None:
            self._bootstrap_task.cancel()
            await asyncio.gather(self._bootstrap_task, return_exceptions=True)
            self._bootstrap_task = None
        try:
            trio_thread.run_sync_soon(self._node.request_stop)
            # Withdraws every key (bounded), then closes the host.
            await asyncio.wait_for(
                trio_thread.submit(self._node.wait_stopped),
                self.options.withdraw_on_stop_timeout + 5,
            )
        except Exception as exc:
            log.warning("libp2p did not stop cleanly: %r", exc)
        await asyncio.to_thread(trio_thread.stop)

    def _bridge(self) -> TrioThread:
        if self._trio is None:
            raise RuntimeError("router is not running")
        return self._trio

    def _stopped(self) -> bool:
        """After stop(), calls are no-ops: shutdown need not be ordered around the router."""
        if self._trio is None and self._node is not None:
            log.debug("routing already stopped: call ignored")
            return True
        return False

    # ----------------------------------------------------------------- Router

    async def advertise(self, keys: Iterable[str]) -> None:
        """New keys reach their closest peers before this returns; known ones are refreshed
        by the router itself every `reannounce_interval`."""
        hashes = [key_multihash(k) for k in keys]
        if hashes and not self._stopped():
            await self._bridge().submit(self._node.advertise, hashes)

    async def withdraw(self, keys: Iterable[str]) -> None:
        """Stops re-announcing and tells the keys' current closest peers to drop this node's
        records (holders it no longer counts among the closest keep them until the TTL)."""
        hashes = [key_multihash(k) for k in keys]
        if hashes and not self._stopped():
            await self._bridge().submit(self._node.withdraw, hashes)

    async def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]:
        async for peer in self._lookup(key, limit, use_local=True):
            yield peer

    async def _lookup(self, key: str, limit: int, use_local: bool) -> AsyncIterator[Peer]:
        # Before start() finished (the registry answers first) or after stop(): nobody is known.
        if limit <= 0 or self._stopped() or not self._serving:
            return
        bridge = self._bridge()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        port = self._registry_port

        def emit(info: Any) -> None:  # runs in trio; the node only offers usable addresses
            from shoal.routing.libp2p.host import provider_ip

            peer = Peer(str(info.peer_id), http_hostport(str(provider_ip(info)), port))
            loop.call_soon_threadsafe(queue.put_nowait, peer)

        fut = bridge.submit(self._node.find_providers, key_multihash(key), limit, emit, use_local)
        # Settled through call_soon_threadsafe after every emit, so _DONE queues behind them.
        fut.add_done_callback(lambda _: queue.put_nowait(_DONE))
        yielded = 0
        try:
            while yielded < limit:
                item = await queue.get()
                if item is _DONE:
                    failure = None if fut.cancelled() else fut.exception()
                    if failure is not None:
                        raise failure
                    return
                yielded += 1
                yield item
        finally:
            if not fut.done():
                fut.cancel()  # the trio side shields its stream opens/resets

    def ready(self) -> bool:
        if self._trio is None or not self._serving:
            return False
        if self._ready_alone:
            return True
        return self._node.stats.connected > 0

    def node_info(self) -> NodeInfo:
        return self._info

    def members(self) -> list[Peer]:
        if self._node is None:
            return []
        port = self._registry_port
        return [Peer(pid, http_hostport(ip, port)) for pid, ip in self._node.stats.members]

    # ----------------------------------------------------------------- extras

    @property
    def peer_id(self) -> str:
        return self._info.id

    def stats(self) -> dict[str, float]:
        """Routing table size, connections, keys and stored records, for metrics."""
        if self._node is None:
            return {}
        s, c = self._node.stats, self._node.counters
        return {
            "routing_table_peers": s.routing_table,
            "connected_peers": s.connected,
            "advertised_keys": s.keys,
            "stored_records": s.stored_records,
            "table_settled": s.table_settled,
            "announce_streams": c.announce_streams,
            "announce_failures": c.announce_failures,
            "records_sent": c.records_sent,
            "records_received": c.records_received,
            "lookups": c.lookups,
            "lookup_local_hits": c.lookup_local_hits,
            "lookup_store_only": c.lookup_store_only,
            "lookup_queries": c.lookup_queries,
            "lookup_query_failures": c.lookup_query_failures,
            "exchange_timeouts": c.exchange_timeouts,
            "loop_lag_max_seconds": round(c.loop_lag_max, 3),
        }

    async def connect(self, addrs: Iterable[str], timeout: float = 5.0) -> int:
        """Dial multiaddrs with /p2p/<id> now (bootstrap does this on its own); returns how
        many peers answered."""
        return await self._bridge().submit(self._node.connect, list(addrs), timeout)

    async def _bootstrap_loop(self) -> None:
        """Discover and dial peers: retried with backoff while the routing table is empty,
        and every `rediscover_interval` a few unknown peers are dialled to heal partitions."""
        assert self._discovery is not None
        opts = self.options
        delay = opts.bootstrap_retry_min
        last = -float("inf")
        while True:
            # Alone: no routing-table peer, or no connection left (peers gone; dead entries
            # linger in the routing table for a long time).
            stats = self._node.stats
            empty = stats.routing_table == 0 or stats.connected == 0
            now = time.monotonic()
            if empty or now - last >= opts.rediscover_interval:
                last = now
                connected = 0
                try:
                    addrs = await self._discovery.discover()
                    mine = set(self._info.addrs)
                    addrs = [a for a in addrs if a not in mine and self._info.id not in a]
                    random.shuffle(addrs)
                    limit = opts.bootstrap_max_peers if empty else 3
                    if addrs:
                        connected = await self._bridge().submit(
                            self._node.connect, addrs, 5.0, limit, not empty
                        )
                except Exception:
                    log.exception("bootstrap failed")
                if empty and connected == 0:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, opts.bootstrap_retry_max)
                    continue
                if connected:
                    log.info("bootstrap: connected to %d peer(s)", connected)
                delay = opts.bootstrap_retry_min
            await asyncio.sleep(opts.tick_interval)
