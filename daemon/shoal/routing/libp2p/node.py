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
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from shoal.routing import wire
from shoal.routing.libp2p import internals
from shoal.routing.libp2p.announce import Announcer
from shoal.routing.libp2p.exchange import Exchanges, Failures
from shoal.routing.libp2p.host import Host
from shoal.routing.libp2p.lookup import ProviderSearch
from shoal.routing.libp2p.membership import Membership
from shoal.routing.libp2p.stats import Counters, NodeStats
from shoal.routing.options import RoutingOptions

log = logging.getLogger("shoal.routing.node")  # its name before the split, kept for log readers


class P2PNode:
    """One libp2p host + DHT. Construct anywhere; `serve` runs inside trio."""

    def __init__(
        self,
        key_pair: KeyPair,
        listen_host: str,
        listen_port: int,
        announce_host: str,
        announce_port: int,
        options: RoutingOptions | None = None,
        psk: str | None = None,
    ) -> None:
        self.options = options or RoutingOptions()
        self.counters = Counters()
        self.core = Host(
            key_pair, listen_host, listen_port, announce_host, announce_port, self.options, psk
        )
        self.failures = Failures(self.core)
        self.exchanges = Exchanges(self.core, self.failures, self.counters)
        self.membership = Membership(self.core, self.failures, self.exchanges)
        self.announcer = Announcer(
            self.core, self.membership, self.failures, self.exchanges, self.counters
        )
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
        """Dial `/…/p2p/<id>` multiaddrs (see Membership.connect); returns how many answered."""
        connected = await self.membership.connect(addrs, timeout, limit, skip_known)
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
        search = ProviderSearch(
            self.core,
            self.membership,
            self.failures,
            self.exchanges,
            self.counters,
            self._bg,
            key,
            limit,
            emit,
        )
        return await search.run(use_local)


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(0.9, 1.1)
