"""Bulk announce: each target peer gets all of its keys over one stream (`shoal.routing.wire`),
written straight into its provider store.

For each key the `replication` closest nodes are computed locally: from the routing table, and
beyond `replication` nodes from one FIND_NODE walk per keyspace region. New keys go out at once,
peers new to us get their share within a tick, and everything is re-sent every
`reannounce_interval` so records (TTL `record_ttl`) stay alive.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import trio
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.provider_store import ProviderRecord
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from shoal.routing import wire
from shoal.routing.keys import keyspace_point
from shoal.routing.libp2p import internals
from shoal.routing.libp2p.exchange import finish
from shoal.routing.libp2p.host import ip_of
from shoal.routing.libp2p.membership import Membership
from shoal.routing.options import is_unspecified

log = logging.getLogger("shoal.routing.node")  # its name before the split, kept for log readers


class _Batch:
    """New keys gathered for one announcement; its first caller sends it."""

    def __init__(self) -> None:
        self.keys: dict[bytes, None] = {}
        self.leader = False
        self.sent = trio.Event()


class Announcer:
    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self.host, self.failures = membership.host, membership.failures
        self.exchanges, self.counters = membership.exchanges, membership.exchanges.counters
        self.options = self.host.options
        self.keys: set[bytes] = set()
        self.covered: set[ID] = set()  # peers holding their share of all our keys
        self.regions: dict[tuple[int, int], tuple[float, list[ID]]] = {}
        self._send_limiter = trio.CapacityLimiter(self.options.announce_parallel)
        self._batch = _Batch()  # keys waiting for their announcement

    async def targets(self, keys: list[bytes], peers: list[ID]) -> dict[ID, list[bytes]]:
        """For each peer, the keys it is among the `replication` closest for (self included).

        Up to `replication` nodes everyone holds everything. Beyond that, the routing table
        holds only a sample of the far parts of the keyspace, so keys are grouped by region
        (the top bits of their keyspace point, about `replication` nodes per region) and each
        region's closest nodes are walked for once (FIND_NODE, cached): one walk per region
        instead of one per key, as stock provide() does.
        """
        me = self.host.me
        r = self.options.replication
        everyone = [*peers, me]
        if len(everyone) <= r:
            return {p: keys for p in peers}
        bits = max(1, math.ceil(math.log2(len(everyone) / r)))
        regions: dict[int, list[bytes]] = {}
        for key in keys:
            regions.setdefault(keyspace_point(key) >> (256 - bits), []).append(key)
        base = {p: keyspace_point(p.to_bytes()) for p in everyone}
        # No bucket ever filled up: the table holds every node we heard of, walks add nothing.
        walks = self.options.announce_region_walks
        complete = walks == "never" or (
            walks == "auto" and not internals.buckets_ever_filled(self.host.kad)
        )
        groups: dict[ID, list[bytes]] = {}
        for region, region_keys in regions.items():
            points = dict(base)
            if not complete:
                for peer in await self._region_peers(bits, region, region_keys[0]):
                    points.setdefault(peer, keyspace_point(peer.to_bytes()))
            items = list(points.items())
            for n, key in enumerate(region_keys, 1):
                if n % 512 == 0:
                    await trio.lowlevel.checkpoint()  # thousands of keys: let others run
                target = keyspace_point(key)
                for peer, _ in heapq.nsmallest(r, items, key=lambda item: item[1] ^ target):
                    if peer != me:
                        groups.setdefault(peer, []).append(key)
        return groups

    async def _region_peers(self, bits: int, region: int, sample: bytes) -> list[ID]:
        """The nodes closest to a keyspace region, from a network walk at most every 5 min."""
        now = trio.current_time()
        cached = self.regions.get((bits, region))
        if cached is None or cached[0] < now:
            found: list[ID] = []
            with trio.move_on_after(10):
                found = await self.host.kad.peer_routing.find_closest_peers_network(sample)
            self.regions[(bits, region)] = (now + 300, found)
            cached = self.regions[(bits, region)]
        me = self.host.me
        return [p for p in cached[1] if p != me and not self.failures.is_failed(p, now)]

    def _store_own(self, keys: Iterable[bytes], add: bool) -> None:
        store = internals.provider_records(self.host.kad)
        me = str(self.host.peer_id)
        if add:
            info, now = self.host.own_info(), time.time()
            for key in keys:
                store.setdefault(key, {})[me] = ProviderRecord(info, now)
        else:
            for key in keys:
                holders = store.get(key)
                if holders is not None:
                    holders.pop(me, None)
                    if not holders:
                        del store[key]

    async def advertise(self, keys: list[bytes]) -> int:
        """Add keys; the new ones are announced within `announce_linger`, together with those
        other calls add meanwhile. Returns how many were new, once they went out."""
        batch = self._batch
        new = [k for k in dict.fromkeys(keys) if k not in self.keys and k not in batch.keys]
        if not new:
            return 0
        batch.keys.update(dict.fromkeys(new))
        if batch.leader:
            await batch.sent.wait()
            return len(new)
        batch.leader = True
        opts = self.options
        # Shielded, with a deadline of its own: the callers that joined wait on this send.
        budget = opts.announce_linger + opts.announce_open_timeout + opts.announce_frame_timeout
        with trio.CancelScope(shield=True, deadline=trio.current_time() + budget):
            try:
                await trio.sleep(opts.announce_linger)
                self._batch = _Batch()
                keys_out = list(batch.keys)
                # Peers not covered yet get their share of the older keys first; then every
                # covered peer (them included) gets the new ones.
                await self.welcome_newcomers()
                self.keys.update(keys_out)
                self._store_own(keys_out, add=True)
                await self._announce(keys_out, wire.OP_ADD)
            finally:
                if self._batch is batch:
                    self._batch = _Batch()
                self.keys.update(batch.keys)  # kept: announce_all re-sends every key
                batch.sent.set()
        return len(new)

    async def withdraw(self, keys: list[bytes]) -> None:
        """Stop re-announcing and ask the current holders to drop our records. Keys this run
        never announced are sent too: an earlier run of this node (same peer ID) may have."""
        gone = list(dict.fromkeys(keys))
        self.keys.difference_update(gone)
        for key in gone:
            self._batch.keys.pop(key, None)
        self._store_own(gone, add=False)
        if gone:
            await self._announce(gone, wire.OP_REMOVE)

    async def announce_all(self) -> None:
        """Re-send every key to its current closest peers (refreshes record timestamps)."""
        keys = list(self.keys)
        self._store_own(keys, add=True)
        self.covered = await self._announce(keys, wire.OP_ADD, to_all=True)

    async def welcome_newcomers(self) -> None:
        """Peers not yet holding their share of all our keys get it now.

        They count as covered from this moment (before the keys are even sent), so an
        advertise() racing with this includes them; a failed send uncovers them again.
        """
        newcomers = set(self.membership.dht_peers()) - self.covered
        if not newcomers:
            return
        self.covered |= newcomers
        if self.keys:
            await self._announce(list(self.keys), wire.OP_ADD, only=newcomers)

    async def withdraw_all(self) -> None:
        timeout = self.options.withdraw_on_stop_timeout
        if self.keys and timeout > 0:
            # Sends are shielded: each gets the whole budget as its own deadline instead.
            with trio.move_on_after(timeout):
                await self._announce(list(self.keys), wire.OP_REMOVE, timeout=timeout)

    async def _announce(
        self,
        keys: list[bytes],
        op: int,
        only: set[ID] | None = None,
        timeout: float | None = None,
        to_all: bool = False,
    ) -> set[ID]:
        """Send `keys` to their closest peers; returns the peers that took theirs or needed none.

        `covered` holds the peers that have their share of *all* our keys. New keys (an add
        without `only` or `to_all`) go to covered peers only: the others get everything, new
        keys included, from the next tick's `welcome_newcomers`, so nothing is sent twice.
        """
        peers = self.membership.dht_peers()
        groups = await self.targets(keys, peers)
        if only is not None:
            groups = {p: ks for p, ks in groups.items() if p in only}
        elif op == wire.OP_ADD and not to_all:
            groups = {p: ks for p, ks in groups.items() if p in self.covered}
        ok: set[ID] = set()
        addrs = [a.to_bytes() for a in self.host.own_addrs()]

        async def send(peer: ID, peer_keys: list[bytes]) -> None:
            async with self._send_limiter:
                if await self._send(peer, op, addrs, peer_keys, timeout):
                    ok.add(peer)

        async with trio.open_nursery() as nursery:
            for peer, peer_keys in groups.items():
                nursery.start_soon(send, peer, peer_keys)
        return ok | (set(peers) - set(groups))

    async def _send(
        self,
        peer: ID,
        op: int,
        addrs: list[bytes],
        keys: list[bytes],
        timeout: float | None = None,
    ) -> bool:
        opts = self.options
        step = opts.announce_frame_keys
        frames = [keys[i : i + step] for i in range(0, len(keys), step)]
        if timeout is None:
            timeout = opts.announce_open_timeout + opts.announce_frame_timeout * len(frames)

        async def body(stream: Any) -> None:
            for chunk in frames:
                await stream.write(wire.encode_announce(op, addrs, chunk))
                wire.decode_ack(await wire.read_message(stream, 64))

        ok, _, timed_out = await self.exchanges.exchange(
            peer, wire.ANNOUNCE_PROTOCOL, timeout, body, reuse=True
        )
        if ok:
            self.counters.announce_streams += 1
            self.counters.records_sent += len(keys)
            self.failures.mark_ok(peer)
        else:
            self.counters.announce_failures += 1
            self.failures.mark_failed(peer, timed_out)
            self.covered.discard(peer)  # the tick re-sends its whole share when it is back
        return ok

    async def handle(self, stream: Any) -> None:
        """The announce protocol's handler: applies each frame, answers how many records."""
        peer = stream.muxed_conn.peer_id
        timeout = self.options.inbound_read_timeout
        failed = True
        try:
            # The sender speaks shoal's DHT: it belongs in our routing table.
            await self.host.kad.add_peer(peer, skip_server_mode_check=True)
            while True:
                # Senders keep the stream for their next announce; one idle for `timeout`
                # is reset, so it holds nothing for long.
                with trio.fail_after(timeout):
                    try:
                        body = await wire.read_message(stream, wire.MAX_FRAME)
                    except EOFError:
                        break  # the sender closed its side: done
                    applied = self._apply(peer, wire.decode_announce(body))
                    await stream.write(wire.encode_ack(applied))
            failed = False
        except Exception as exc:
            log.debug("announce stream from %s ended: %r", peer, exc)
        finally:
            await finish(stream, ok=not failed)

    def _apply(self, peer: ID, msg: wire.Announce) -> int:
        """Write (or drop) the sender's records straight into the DHT's provider store."""
        store = internals.provider_records(self.host.kad)
        pid = str(peer)
        if msg.op == wire.OP_REMOVE:
            removed = 0
            for key in msg.keys:
                holders = store.get(key)
                if holders is not None and holders.pop(pid, None) is not None:
                    removed += 1
                    if not holders:
                        del store[key]
            return removed
        addrs = []
        for raw in msg.addrs:
            try:
                addr = Multiaddr(raw)
            except Exception:
                continue
            ip = ip_of(addr)
            if ip and not is_unspecified(ip):
                addrs.append(addr)
        if not addrs:
            return 0
        # One PeerInfo shared by all records of this sender keeps a record at a few hundred bytes.
        info, now = PeerInfo(peer, addrs), time.time()
        applied = 0
        for key in msg.keys:
            holders = store.get(key)
            if holders is None:
                store[key] = {pid: ProviderRecord(info, now)}
            elif pid in holders or len(holders) < BUCKET_SIZE:
                holders[pid] = ProviderRecord(info, now)
            else:
                continue  # k providers already, as the stock store does
            applied += 1
        self.counters.records_received += applied
        return applied
