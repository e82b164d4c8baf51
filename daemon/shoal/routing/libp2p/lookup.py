"""The fast lookup: GET_PROVIDERS to the closest peers, one first, then up to `lookup_parallel`
(hedged, per-peer deadline), stopping at `limit` providers or once a few holders answered.
Results are deduplicated and never written back into the store (stale records must expire)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import trio
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from shoal.routing.keys import keyspace_point
from shoal.routing.libp2p.exchange import TIMED_OUT
from shoal.routing.libp2p.host import provider_ip
from shoal.routing.libp2p.membership import Membership


class ProviderSearch:
    """One lookup of `key`: `emit` is called for up to `limit` distinct providers other than
    this node, first found first; providers known to be failing are offered last.

    Queries run in `nursery` (the node's background nursery): returning early (limit reached,
    caller cancelled) never interrupts an exchange, which finishes within its own deadline.
    """

    def __init__(
        self,
        membership: Membership,
        nursery: trio.Nursery,
        key: bytes,
        limit: int,
        emit: Callable[[PeerInfo], None],
    ) -> None:
        self.membership, self.nursery = membership, nursery
        self.host, self.failures = membership.host, membership.failures
        self.exchanges, self.counters = membership.exchanges, membership.exchanges.counters
        self.options = self.host.options
        self.key, self.limit, self.emit = key, limit, emit
        self.seen: set[ID] = {self.host.me}
        self.held: list[PeerInfo] = []  # providers we know are failing: offered last
        self.found = 0
        # The walk:
        self.target = keyspace_point(key)
        self.known: set[ID] = set()
        self.ranked: list[ID] = []
        self.queried: set[ID] = set()
        self.done: set[ID] = set()  # answered or failed, in this lookup
        self.slow: list[ID] = []  # timed out, in this lookup
        self.retried = False
        self.inflight = self.answers = self.with_providers = self.quiet = 0
        self.whole = False
        self._send, self._recv = trio.open_memory_channel[tuple[ID, Any]](math.inf)

    async def run(self, use_local: bool = True) -> int:
        """Returns how many providers were emitted."""
        self.counters.lookups += 1
        if self.limit <= 0:
            return 0
        if use_local and self._local():
            return self.found
        if use_local and self.membership.table_is_settled(trio.current_time()):
            self.counters.lookup_store_only += 1
        else:
            try:
                await self._walk()
            finally:
                self._send.close()
                self._recv.close()
        for info in self.held:
            if self.found >= self.limit:
                break
            self.emit(info)
            self.found += 1
        return self.found

    def _offer(self, info: PeerInfo) -> bool:
        """Emits `info` if it is a new, usable provider; True once `limit` are emitted."""
        if provider_ip(info) is None:
            return self.found >= self.limit  # no address a registry client could use
        if info.peer_id not in self.seen and self.found < self.limit:
            self.seen.add(info.peer_id)
            if self.failures.is_failed(info.peer_id):
                self.held.append(info)
            else:
                self.emit(info)
                self.found += 1
        return self.found >= self.limit

    def _local(self) -> bool:
        """Offers this node's own records; True when they were enough."""
        local = self.host.kad.provider_store.get_providers(self.key)
        if any(info.peer_id != self.host.me for info in local):
            self.counters.lookup_local_hits += 1
        return any(self._offer(info) for info in local)

    def _rank(self, now: float) -> list[ID]:
        # Failing peers last, else closest first; only the `replication` closest known are
        # worth asking: that is where records are stored.
        order = sorted(
            self.known,
            key=lambda p: (
                self.failures.is_failed(p, now),
                keyspace_point(p.to_bytes()) ^ self.target,
            ),
        )
        return order[: self.options.replication]

    def _launch(self, want: int) -> None:
        for peer in self.ranked:
            if self.inflight >= want:
                return
            if peer not in self.queried:
                self.queried.add(peer)
                self.inflight += 1
                self.nursery.start_soon(self._query, peer)

    async def _query(self, peer: ID) -> None:
        self.counters.lookup_queries += 1
        result = await self.exchanges.query(peer, self.key, Message.MessageType.GET_PROVIDERS)
        try:
            self._send.send_nowait((peer, result))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the lookup already returned

    async def _walk(self) -> None:
        opts = self.options
        me = self.host.me
        table = self.host.kad.routing_table
        candidates = table.find_local_closest_peers(self.key, opts.replication)
        if len(candidates) < opts.replication:
            connected = self.host.host.get_connected_peers()
            candidates += [p for p in connected if p not in candidates]
        self.known = {p for p in candidates if p != me}
        now = trio.current_time()
        self.ranked = self._rank(now)
        self.whole = self.membership.table_is_whole()  # then no walk is needed
        # One query first; more join when it is slow (hedging) or after each answer without
        # enough providers, up to `lookup_parallel` at once.
        self._launch(1)
        while self.inflight:
            with trio.move_on_after(opts.lookup_hedge_delay) as waited:
                peer, result = await self._recv.receive()
            if waited.cancelled_caught:
                self._launch(min(self.inflight + 1, opts.lookup_parallel))
                continue
            self.inflight -= 1
            self.done.add(peer)
            if result is None or result is TIMED_OUT:
                self._failed(peer, result)
                continue
            if self._answered(result, now):
                return

    def _failed(self, peer: ID, result: Any) -> None:
        opts = self.options
        if result is TIMED_OUT:
            self.slow.append(peer)
        self._launch(min(self.inflight + 1, opts.lookup_parallel))  # replace the failed one
        if not self.inflight and self.found == 0 and self.slow and not self.retried:
            # Everyone asked timed out: more likely this node stalled (a busy machine) than
            # the whole cluster; ask those once more.
            self.retried = True
            self.queried.difference_update(self.slow)
            self._launch(opts.lookup_parallel)

    def _answered(self, result: tuple[list[PeerInfo], list[ID]], now: float) -> bool:
        """Takes one answer in; True when the walk is over."""
        opts = self.options
        providers, closer = result
        if any(self._offer(info) for info in providers):
            return True
        self.answers += 1
        self.with_providers += bool(providers)
        me = self.host.me
        fresh = [p for p in closer if p != me and p not in self.known]
        self.known.update(fresh)
        self.whole = self.whole and not fresh
        if self.whole and self.answers >= opts.lookup_whole_answers:
            return True
        closest = self._rank(now) if fresh else self.ranked
        self.quiet = self.quiet + 1 if closest == self.ranked else 0
        self.ranked = closest
        # A holder returns every provider it stores, so a few holders that answered tell the
        # whole story (fewer than `limit` exist). A walk that no longer gets closer, with the
        # closest few all asked, has met the holders (or there are none: a miss) without
        # asking all `replication` of them.
        nearest = self.ranked[: opts.lookup_quiet_answers]
        if self.with_providers >= opts.lookup_enough_answers or (
            self.quiet >= opts.lookup_quiet_answers and all(p in self.done for p in nearest)
        ):
            return True
        self._launch(1 if self.whole else opts.lookup_parallel)  # else widen, as Kademlia does
        return False
