"""The trio side of the libp2p router: one host and DHT, with shoal's bulk announce and fast
lookup replacing the stock ones (docs/libp2p.md says why).

Everything here runs in the router's trio thread; `shoal.routing.libp2p.router.Libp2pRouter`
is the asyncio face. The parts, by concern: `host` (identity, addresses), `exchange` (one
request/response on a pooled stream, failing peers), `membership` (dialling, members, finding
more), `announce`, `lookup`, and `internals` (every private py-libp2p access).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from shoal.routing import wire
from shoal.routing.libp2p import internals
from shoal.routing.libp2p.announce import Announcer
from shoal.routing.libp2p.exchange import Exchanges, Failures
from shoal.routing.libp2p.host import Host
from shoal.routing.libp2p.lookup import ProviderSearch
from shoal.routing.libp2p.membership import Membership
from shoal.routing.libp2p.stats import Counters, NodeStats

log = logging.getLogger("shoal.routing.node")  # its name before the split, kept for log readers


class P2PNode:
    """One libp2p host + DHT (made when `serve` runs, inside trio)."""

    def __init__(self, core: Host) -> None:
        self.core = core
        self.options = core.options
        self.counters = Counters()
        self.failures = Failures(core)
        self.exchanges = Exchanges(core, self.failures, self.counters)
        self.membership = Membership(self.exchanges)
        self.announcer = Announcer(self.membership)
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._next_full = 0.0
        self._bg: trio.Nursery | None = None

    # The host's parts, by the names tests and the router use.
    @property
    def host(self) -> Any:
        return self.core.host

    @property
    def dht(self) -> Any:
        return self.core.dht

    @property
    def peer_id(self) -> ID | None:
        return self.core.peer_id

    @property
    def stats(self) -> NodeStats:
        return self.membership.stats

    # ----------------------------------------------------------------- lifecycle

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `request_stop()`; reports started once listening with the DHT up."""
        opts = self.options
        self.core.make()
        host = self.core.host
        host.set_stream_handler(TProtocol(wire.ANNOUNCE_PROTOCOL), self.announcer.handle)
        try:
            async with host.run(listen_addrs=[self.core.listen]):
                internals.fix_addrs(host)
                async with background_trio_service(self.core.kad):
                    self._next_full = trio.current_time() + _jittered(opts.reannounce_interval)
                    task_status.started()
                    async with trio.open_nursery() as nursery:
                        self._bg = nursery
                        nursery.start_soon(self._maintain)
                        nursery.start_soon(self._watch_lag)
                        await self._stop.wait()
                        await self.announcer.withdraw_all()
                        self.exchanges.hurry(1.0)
                        nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def listen_addrs(self) -> list[str]:
        """Announced multiaddrs including `/p2p/<id>`."""
        return self.core.listen_addrs()

    async def _maintain(self) -> None:
        opts = self.options
        while True:
            await trio.sleep(opts.tick_interval)
            try:
                self._sample()
                await self.exchanges.close_idle()
                now = trio.current_time()
                # A peer whose connections were all replaced may have restarted with an empty
                # store: it gets its share of our keys again at once.
                self.announcer.covered.difference_update(self.membership.reconnected())
                await self.membership.maybe_refresh(now)
                if now >= self._next_full:
                    self._next_full = now + _jittered(opts.reannounce_interval)
                    await self.announcer.announce_all()
                else:
                    await self.announcer.welcome_newcomers()
                self.failures.forget_old(now)
            except Exception:
                log.exception("routing maintenance failed")

    async def _watch_lag(self) -> None:
        """Track how late the trio loop wakes up (a starved or blocked loop misses deadlines)."""
        while True:
            start = trio.current_time()
            await trio.sleep(0.1)
            lag = trio.current_time() - start - 0.1
            if lag > self.counters.loop_lag_max:
                self.counters.loop_lag_max = lag
            if lag > 0.5:
                log.debug("trio loop woke %.2fs late", lag)

    def _sample(self) -> None:
        self.membership.sample(len(self.announcer.keys))

    # ----------------------------------------------------------------- what the router calls

    async def connect(
        self,
        addrs: Iterable[str],
        timeout: float = 5.0,
        limit: int | None = None,
        skip_known: bool = False,
    ) -> int:
        """Dial `/…/p2p/<id>` multiaddrs (at most `limit` peers, optionally only ones not in
        the routing table), add them to the routing table, then look ourselves up."""
        dht, me, host = self.core.kad, self.core.me, self.core.host
        infos: dict[ID, PeerInfo] = {}
        for text in addrs:
            try:
                info = info_from_p2p_addr(Multiaddr(text))
            except Exception as exc:
                log.warning("bad bootstrap address %s: %s", text, exc)
                continue
            if info.peer_id == me:
                continue
            if skip_known and dht.routing_table.peer_in_table(info.peer_id):
                continue
            known = infos.get(info.peer_id)
            if known is None:
                if limit is not None and len(infos) >= limit:
                    continue
                infos[info.peer_id] = info
            else:
                infos[info.peer_id] = PeerInfo(info.peer_id, known.addrs + info.addrs)
        connected = 0

        async def dial(info: PeerInfo) -> None:
            nonlocal connected
            with trio.move_on_after(timeout):
                try:
                    host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
                    await host.connect(info)
                    await dht.routing_table.add_peer(info)
                    self.failures.mark_ok(info.peer_id)
                    connected += 1
                except Exception as exc:
                    log.info("bootstrap peer %s unreachable: %s", info.peer_id, exc)

        async with trio.open_nursery() as nursery:
            for info in infos.values():
                nursery.start_soon(dial, info)
        if connected:
            with trio.move_on_after(10):
                await dht.peer_routing.find_closest_peers_network(me.to_bytes())
        self._sample()
        return connected

    async def advertise(self, keys: list[bytes]) -> int:
        return await self.announcer.advertise(keys)

    async def withdraw(self, keys: list[bytes]) -> None:
        await self.announcer.withdraw(keys)

    async def find_providers(
        self,
        key: bytes,
        limit: int,
        emit: Callable[[PeerInfo], None],
        use_local: bool = True,
    ) -> int:
        """Call `emit` for up to `limit` distinct providers other than us (see ProviderSearch)."""
        assert self._bg is not None
        search = ProviderSearch(self.membership, self._bg, key, limit, emit)
        return await search.run(use_local)


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(0.9, 1.1)
