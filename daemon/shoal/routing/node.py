"""The trio side of the libp2p router: host, Kademlia DHT, bulk announce and the fast lookup.

Everything here runs in the router's trio thread; `shoal.routing.p2p.Libp2pRouter` is the asyncio
face. Two paths replace the stock ones (see shared notes, p2p-facts.md):

* announce: for each key the `replication` closest nodes are computed locally (from the routing
  table; beyond `replication` nodes, from one FIND_NODE walk per keyspace region), and each
  target gets all of its keys over one stream (`shoal.routing.wire`), written straight into its
  provider store. New keys go out at once, peers new to us get their share within a tick, and
  everything is re-sent every `reannounce_interval` so records (TTL `record_ttl`) stay alive.
* lookup: GET_PROVIDERS to the closest peers, one first then up to `lookup_parallel` (hedged,
  per-peer deadline), stopping at `limit` providers or once a few holders answered; results
  are deduplicated and never written back into the store (stale records must expire).

Every stream exchange runs shielded under its own deadline, on pooled streams, because
cancelling libp2p I/O half-way breaks the connection (see `_exchange`).
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.provider_store import ProviderRecord
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from shoal.routing import wire
from shoal.routing.keys import keyspace_point
from shoal.routing.options import RoutingOptions, ip_multiaddr, is_unspecified
from shoal.routing.patches import apply_process_patches, tune_dht

log = logging.getLogger(__name__)

MAX_DHT_RESPONSE = 4 * 1024 * 1024

T = TypeVar("T")
# Seconds a peer stays a cluster member (for choosing designated fetchers) after last seen.
MEMBER_TTL = 60.0

TIMED_OUT = object()  # a lookup query that hit its deadline (as opposed to failing outright)


@dataclass
class NodeStats:
    """Counters and samples read by the asyncio side (replaced whole, never mutated there)."""

    routing_table: int = 0
    connected: int = 0
    keys: int = 0
    stored_records: int = 0
    # (peer ID, IP) of routing-table peers: the cluster members this node knows.
    members: tuple[tuple[str, str], ...] = ()


@dataclass
class _Failure:
    until: float
    backoff: float
    count: int = 0


@dataclass
class Counters:
    announce_streams: int = 0
    announce_failures: int = 0
    records_sent: int = 0
    records_received: int = 0
    lookups: int = 0
    lookup_local_hits: int = 0
    lookup_queries: int = 0
    lookup_query_failures: int = 0
    exchange_timeouts: int = 0
    loop_lag_max: float = 0.0


def _ip_of(addr: Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            value = addr.value_for_protocol(proto)
        except Exception:
            value = None
        if value:
            return str(value)
    return None


def provider_ip(info: PeerInfo) -> str | None:
    """The first concrete IP among a provider's addresses (never 0.0.0.0 / ::)."""
    for addr in info.addrs:
        ip = _ip_of(addr)
        if ip and not is_unspecified(ip):
            return ip
    return None


class _StreamPool:
    """Idle outbound streams kept open for the next exchange with the same peer and protocol.

    Opening a stream costs more than a query itself (yamux SYN/ACK, two multistream round
    trips, FIN/RST: 8 of 11 frames of a GET_PROVIDERS). Both the stock DHT handler and the
    announce handler serve any number of requests per stream; streams idle longer than
    `max_idle` are closed before the server's idle timeout (`inbound_read_timeout`) resets them.
    """

    def __init__(self, per_peer: int, max_idle: float) -> None:
        self._per_peer = per_peer
        self._max_idle = max_idle
        self._idle: dict[tuple[ID, str], list[tuple[Any, float]]] = {}
        self._stale: list[Any] = []

    def take(self, peer: ID, protocol: str) -> Any | None:
        items = self._idle.get((peer, protocol))
        now = trio.current_time()
        while items:
            stream, since = items.pop()
            if now - since < self._max_idle:
                return stream
            self._stale.append(stream)
        return None

    def give(self, peer: ID, protocol: str, stream: Any) -> bool:
        items = self._idle.setdefault((peer, protocol), [])
        if len(items) >= self._per_peer:
            return False
        items.append((stream, trio.current_time()))
        return True

    def drop(self, peer: ID) -> None:
        for key in [k for k in self._idle if k[0] == peer]:
            self._stale.extend(stream for stream, _ in self._idle.pop(key))

    def expired(self) -> list[Any]:
        """Streams to close: idle too long, or dropped."""
        now = trio.current_time()
        out, self._stale = self._stale, []
        for key, items in list(self._idle.items()):
            fresh = [(stream, since) for stream, since in items if now - since < self._max_idle]
            out.extend(stream for stream, since in items if now - since >= self._max_idle)
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]
        return out


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
        self._key_pair = key_pair
        self._listen = Multiaddr(ip_multiaddr(listen_host, listen_port))
        self._announce_host = announce_host
        self._announce_port = announce_port
        self._psk = psk
        self.host: Any = None
        self.dht: KadDHT | None = None
        self.peer_id: ID | None = None
        self.stats = NodeStats()
        self._seen: dict[str, tuple[str, float]] = {}  # peer ID -> (IP, last seen), see _sample
        self.counters = Counters()
        self._keys: set[bytes] = set()
        self._covered: set[ID] = set()
        self._conn_ids: dict[ID, frozenset[int]] = {}
        self._failures: dict[ID, _Failure] = {}
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._next_full = 0.0
        self._bg: trio.Nursery | None = None
        self._exchanges: set[trio.CancelScope] = set()
        self._send_limiter = trio.CapacityLimiter(self.options.announce_parallel)
        self._query_limiter = trio.CapacityLimiter(self.options.lookup_max_inflight)
        self._streams = _StreamPool(per_peer=2, max_idle=self.options.inbound_read_timeout * 0.4)
        self._next_refresh = 0.0
        self._regions: dict[tuple[int, int], tuple[float, list[ID]]] = {}
        self._refresh_interval = self.options.tick_interval
        self._last_rt_size = -1

    # ----------------------------------------------------------------- lifecycle

    def _announce_addrs(self, candidates: list[Multiaddr]) -> list[Multiaddr]:
        """addrs_factory: only the configured address, never the 0.0.0.0 we listen on.

        With an announce port of 0 (tests listen on port 0) the port actually bound is used.
        """
        port = self._announce_port
        if port == 0:
            for addr in candidates:
                try:
                    port = int(addr.value_for_protocol("tcp"))
                    break
                except Exception:
                    continue
        return [Multiaddr(ip_multiaddr(self._announce_host, port))]

    def _make_host(self) -> Any:
        noise = NoiseTransport(self._key_pair, noise_privkey=create_x25519_key_pair().private_key)
        return new_host(
            key_pair=self._key_pair,
            # Noise only: the default also offers TLS, secio and plaintext.
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=[self._listen],
            addrs_factory=self._announce_addrs,
            psk=self._psk,
            enable_mDNS=False,
        )

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `request_stop()`; reports started once listening with the DHT up."""
        opts = self.options
        apply_process_patches(opts.protocol_id, opts.record_ttl, opts.inbound_read_timeout)
        self.host = self._make_host()
        self.peer_id = self.host.get_id()
        self.dht = KadDHT(self.host, DHTMode.SERVER)
        tune_dht(
            self.dht,
            inbound_streams=opts.inbound_streams,
            add_provider_per_10s=opts.add_provider_per_10s,
        )
        self.host.set_stream_handler(TProtocol(wire.ANNOUNCE_PROTOCOL), self._handle_announce)
        try:
            async with self.host.run(listen_addrs=[self._listen]):
                # The announced address is fixed once listening. BasicHost.get_addrs rebuilds
                # it (multiaddr parsing, ~0.6 ms) on every call, and the DHT calls it for every
                # response it signs, so this host answers from a cached copy.
                addrs = self.host.get_addrs()
                self.host.get_addrs = lambda: list(addrs)
                async with background_trio_service(self.dht):
                    self._next_full = trio.current_time() + self._jittered(opts.reannounce_interval)
                    task_status.started()
                    async with trio.open_nursery() as nursery:
                        self._bg = nursery
                        nursery.start_soon(self._maintain)
                        nursery.start_soon(self._watch_lag)
                        await self._stop.wait()
                        await self._withdraw_all()
                        # Exchanges are shielded from cancellation: bring their own deadlines
                        # forward so stopping takes a second, not an announce's 20.
                        soon = trio.current_time() + 1.0
                        for scope in self._exchanges:
                            scope.deadline = min(scope.deadline, soon)
                        nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def listen_addrs(self) -> list[str]:
        """Announced multiaddrs including `/p2p/<id>`."""
        return [str(a) for a in self.host.get_addrs()] if self.host else []

    def _jittered(self, seconds: float) -> float:
        return seconds * random.uniform(0.9, 1.1)

    # ----------------------------------------------------------------- peers

    def _is_failed(self, peer: ID, now: float | None = None, strikes: int = 2) -> bool:
        """Whether `peer` failed `strikes` times in a row and is still backing off.

        One failure is not enough to shun a peer: on a busy node live peers time out too."""
        failure = self._failures.get(peer)
        return (
            failure is not None
            and failure.count >= strikes
            and failure.until > (now or trio.current_time())
        )

    def _mark_failed(self, peer: ID, timed_out: bool) -> None:
        opts = self.options
        now = trio.current_time()
        prev = self._failures.get(peer)
        if prev is None:
            backoff, count = opts.failure_backoff, 1
        else:
            backoff, count = min(prev.backoff * 2, opts.failure_backoff_max), prev.count + 1
        self._failures[peer] = _Failure(now + backoff, backoff, count)
        if count >= 3 and not timed_out and self.dht is not None:
            # Refused three times in a row: gone. It is re-added when it talks to us again.
            # Timeouts do not count here: on a starved machine live peers time out too.
            self.dht.routing_table.remove_peer(peer)

    def _mark_ok(self, peer: ID) -> None:
        self._failures.pop(peer, None)

    def _dht_peers(self) -> list[ID]:
        """Announce targets: known DHT servers, less those that failed twice in a row lately
        (they get their share from the tick once they answer again)."""
        assert self.dht is not None
        now = trio.current_time()
        return [p for p in self.dht.routing_table.get_peer_ids() if not self._is_failed(p, now)]

    async def connect(
        self,
        addrs: Iterable[str],
        timeout: float = 5.0,
        limit: int | None = None,
        skip_known: bool = False,
    ) -> int:
        """Dial `/…/p2p/<id>` multiaddrs (at most `limit` peers, optionally only ones not in
        the routing table), add them to the routing table, then look ourselves up."""
        assert self.dht is not None and self.peer_id is not None
        infos: dict[ID, PeerInfo] = {}
        for text in addrs:
            try:
                info = info_from_p2p_addr(Multiaddr(text))
            except Exception as exc:
                log.warning("bad bootstrap address %s: %s", text, exc)
                continue
            if info.peer_id == self.peer_id:
                continue
            if skip_known and self.dht.routing_table.peer_in_table(info.peer_id):
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
            assert self.dht is not None
            with trio.move_on_after(timeout):
                try:
                    self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
                    await self.host.connect(info)
                    await self.dht.routing_table.add_peer(info)
                    self._mark_ok(info.peer_id)
                    connected += 1
                except Exception as exc:
                    log.info("bootstrap peer %s unreachable: %s", info.peer_id, exc)

        async with trio.open_nursery() as nursery:
            for info in infos.values():
                nursery.start_soon(dial, info)
        if connected:
            with trio.move_on_after(10):
                await self.dht.peer_routing.find_closest_peers_network(self.peer_id.to_bytes())
        self._sample()
        return connected

    def _sample(self) -> None:
        assert self.dht is not None
        store = self.host.get_peerstore()
        now = trio.current_time()
        peers = set(self.dht.routing_table.get_peer_ids()) | set(self.host.get_connected_peers())
        for peer in peers:
            try:
                ip = next((i for i in map(_ip_of, store.addrs(peer)) if i), None)
            except Exception:  # the peerstore raises when it has no addresses
                ip = None
            if ip is not None and not is_unspecified(ip):
                self._seen[str(peer)] = (ip, now)
        # Members stay for MEMBER_TTL after last seen: a peer dropped from the routing table for
        # a moment (a timeout under load) must not change which node fetches a digest.
        for pid in [p for p, (_, t) in self._seen.items() if now - t > MEMBER_TTL]:
            del self._seen[pid]
        members = [(pid, ip) for pid, (ip, _) in self._seen.items()]
        self.stats = NodeStats(
            routing_table=self.dht.routing_table.size(),
            connected=len(self.host.get_connected_peers()),
            keys=len(self._keys),
            stored_records=self.dht.provider_store.size(),
            members=tuple(sorted(members)),
        )

    async def _maintain(self) -> None:
        opts = self.options
        while True:
            await trio.sleep(opts.tick_interval)
            try:
                self._sample()
                for stream in self._streams.expired():
                    await self._finish(stream, ok=True)
                now = trio.current_time()
                self._notice_reconnects()
                await self._maybe_refresh(now)
                if now >= self._next_full:
                    self._next_full = now + self._jittered(opts.reannounce_interval)
                    await self.announce_all()
                else:
                    await self._welcome_newcomers()
                # Forget failures long past so the table does not grow without bound.
                for peer in [p for p, f in self._failures.items() if f.until + 3600 < now]:
                    del self._failures[peer]
            except Exception:
                log.exception("routing maintenance failed")

    def _notice_reconnects(self) -> None:
        """A peer whose connections were all replaced since the last tick may have restarted
        with an empty store: it gets its share of our keys again at once."""
        for peer, conns in self.host.get_network().get_connections_map().items():
            ids = frozenset(id(conn) for conn in conns)
            seen = self._conn_ids.get(peer)
            if seen is not None and ids and seen.isdisjoint(ids):
                self._covered.discard(peer)
            if ids:
                self._conn_ids[peer] = ids

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

    async def _maybe_refresh(self, now: float) -> None:
        """Look ourselves up again soon after the routing table changes, then less and less often.

        Peers that joined at the same time can miss each other in their first self-lookup; the
        stock refresh only comes every 10 minutes.
        """
        assert self.dht is not None and self.peer_id is not None
        size = self.dht.routing_table.size()
        if size != self._last_rt_size:
            self._last_rt_size = size
            self._refresh_interval = self.options.tick_interval
            self._next_refresh = min(self._next_refresh, now + self._refresh_interval)
        if size == 0 or now < self._next_refresh:
            return
        with trio.move_on_after(10):
            if await self._may_find_more():
                await self.dht.peer_routing.find_closest_peers_network(self.peer_id.to_bytes())
        self._refresh_interval = min(self._refresh_interval * 2, self.options.reannounce_interval)
        self._next_refresh = trio.current_time() + self._refresh_interval

    def _table_is_whole(self) -> bool:
        """Fewer peers known than `replication`: each of our records went to all of them, and
        theirs to us (see _targets), unless someone names a peer we do not know."""
        assert self.dht is not None
        return self.dht.routing_table.size() < self.options.replication

    async def _may_find_more(self) -> bool:
        """Whether a refresh walk could find peers we do not know.

        The stock walk opens a new stream to every peer it asks, and in a small network it asks
        them all. While the table holds fewer than `replication` peers, the closest few are
        asked first over pooled streams: when none of them names a peer we do not know, there
        is nobody to find (as in find_providers, see `lookup_whole_answers`).
        """
        assert self.dht is not None and self.peer_id is not None
        opts = self.options
        table = self.dht.routing_table
        if not self._table_is_whole():
            return True
        own = self.peer_id.to_bytes()
        known = set(table.get_peer_ids())
        answers = 0
        for peer in table.find_local_closest_peers(own, opts.replication):
            if answers >= opts.lookup_whole_answers:
                break
            result = await self._query(peer, own, Message.MessageType.FIND_NODE)
            if result is None or result is TIMED_OUT:
                continue
            answers += 1
            _, closer = result
            if any(p != self.peer_id and p not in known for p in closer):
                return True
        return answers == 0  # nobody answered: let the walk try its own way

    # ----------------------------------------------------------------- announce

    def _own_info(self) -> PeerInfo:
        assert self.peer_id is not None
        return PeerInfo(self.peer_id, self._own_addrs())

    def _own_addrs(self) -> list[Multiaddr]:
        suffix = Multiaddr(f"/p2p/{self.peer_id}")
        return [a.decapsulate(suffix) for a in self.host.get_addrs()]

    async def _targets(self, keys: list[bytes], peers: list[ID]) -> dict[ID, list[bytes]]:
        """For each peer, the keys it is among the `replication` closest for (self included).

        Up to `replication` nodes everyone holds everything. Beyond that, the routing table
        holds only a sample of the far parts of the keyspace, so keys are grouped by region
        (the top bits of their keyspace point, about `replication` nodes per region) and each
        region's closest nodes are walked for once (FIND_NODE, cached): one walk per region
        instead of one per key, as stock provide() does.
        """
        assert self.peer_id is not None and self.dht is not None
        r = self.options.replication
        everyone = [*peers, self.peer_id]
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
            walks == "auto"
            and all(b.size() < b.bucket_size for b in self.dht.routing_table.buckets)
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
                    if peer != self.peer_id:
                        groups.setdefault(peer, []).append(key)
        return groups

    async def _region_peers(self, bits: int, region: int, sample: bytes) -> list[ID]:
        """The nodes closest to a keyspace region, from a network walk at most every 5 min."""
        assert self.dht is not None
        now = trio.current_time()
        cached = self._regions.get((bits, region))
        if cached is None or cached[0] < now:
            found: list[ID] = []
            with trio.move_on_after(10):
                found = await self.dht.peer_routing.find_closest_peers_network(sample)
            self._regions[(bits, region)] = (now + 300, found)
            cached = self._regions[(bits, region)]
        return [p for p in cached[1] if p != self.peer_id and not self._is_failed(p, now)]

    def _store_own(self, keys: Iterable[bytes], add: bool) -> None:
        assert self.dht is not None
        store = self.dht.provider_store.providers
        me = str(self.peer_id)
        if add:
            info, now = self._own_info(), time.time()
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
        """Add keys; the new ones are announced now. Returns how many were new."""
        new = [k for k in dict.fromkeys(keys) if k not in self._keys]
        if not new:
            return 0
        # Peers not covered yet get their share of the older keys first; then every covered
        # peer (them included) gets the new ones, so both arrive before this returns.
        await self._welcome_newcomers()
        self._keys.update(new)
        self._store_own(new, add=True)
        await self._announce(new, wire.OP_ADD)
        return len(new)

    async def withdraw(self, keys: list[bytes]) -> None:
        """Stop re-announcing and ask the current holders to drop our records. Keys this run
        never announced are sent too: an earlier run of this node (same peer ID) may have."""
        gone = list(dict.fromkeys(keys))
        self._keys.difference_update(gone)
        self._store_own(gone, add=False)
        if gone:
            await self._announce(gone, wire.OP_REMOVE)

    async def announce_all(self) -> None:
        """Re-send every key to its current closest peers (refreshes record timestamps)."""
        keys = list(self._keys)
        self._store_own(keys, add=True)
        self._covered = await self._announce(keys, wire.OP_ADD, to_all=True)

    async def _welcome_newcomers(self) -> None:
        """Peers not yet holding their share of all our keys get it now.

        They count as covered from this moment (before the keys are even sent), so an
        advertise() racing with this includes them; a failed send uncovers them again.
        """
        newcomers = set(self._dht_peers()) - self._covered
        if not newcomers:
            return
        self._covered |= newcomers
        if self._keys:
            await self._announce(list(self._keys), wire.OP_ADD, only=newcomers)

    async def _withdraw_all(self) -> None:
        timeout = self.options.withdraw_on_stop_timeout
        if self._keys and timeout > 0:
            # Sends are shielded: each gets the whole budget as its own deadline instead.
            with trio.move_on_after(timeout):
                await self._announce(list(self._keys), wire.OP_REMOVE, timeout=timeout)

    async def _announce(
        self,
        keys: list[bytes],
        op: int,
        only: set[ID] | None = None,
        timeout: float | None = None,
        to_all: bool = False,
    ) -> set[ID]:
        """Send `keys` to their closest peers; returns the peers that took theirs or needed none.

        `_covered` holds the peers that have their share of *all* our keys. New keys (an
        add without `only` or `to_all`) go to covered peers only: the others get everything,
        new keys included, from the next tick's `_welcome_newcomers`, so nothing is sent twice.
        """
        peers = self._dht_peers()
        groups = await self._targets(keys, peers)
        if only is not None:
            groups = {p: ks for p, ks in groups.items() if p in only}
        elif op == wire.OP_ADD and not to_all:
            groups = {p: ks for p, ks in groups.items() if p in self._covered}
        ok: set[ID] = set()
        addrs = [a.to_bytes() for a in self._own_addrs()]

        async def send(peer: ID, peer_keys: list[bytes]) -> None:
            async with self._send_limiter:
                if await self._send(peer, op, addrs, peer_keys, timeout):
                    ok.add(peer)

        async with trio.open_nursery() as nursery:
            for peer, peer_keys in groups.items():
                nursery.start_soon(send, peer, peer_keys)
        return ok | (set(peers) - set(groups))

    async def _exchange(
        self,
        peer: ID,
        protocol: str,
        timeout: float,
        body: Callable[[Any], Awaitable[T]],
        reuse: bool = False,
    ) -> tuple[bool, T | None, bool]:
        """Run `body(stream)` on a stream to `peer` under one shielded deadline.

        Returns (ok, body's result, timed out). With `reuse`, an idle pooled stream is tried
        first (and the stream pooled again afterwards); a pooled stream the server already
        dropped is retried once on a fresh one.

        Nothing outside (a lookup that has its answer, a caller that gave up) interrupts an
        exchange: the stream is closed or reset properly and the peer sees no half-request.
        Connection-level writes are shielded as well (see patches.shield_yamux_writes), so even
        the deadline firing mid-exchange leaves the connection usable.
        """
        ok, result = False, None
        with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout) as scope:
            self._exchanges.add(scope)
            for _attempt in range(2):
                stream = self._streams.take(peer, protocol) if reuse else None
                pooled = stream is not None
                try:
                    if stream is None:
                        stream = await self.host.new_stream(peer, [TProtocol(protocol)])
                    result = await body(stream)
                    ok = True
                except Exception as exc:
                    log.debug("%s exchange with %s failed: %r", protocol, peer, exc)
                keep = ok and reuse and self._streams.give(peer, protocol, stream)
                if stream is not None and not keep:
                    await self._finish(stream, ok)
                if ok or not pooled:
                    break
        self._exchanges.discard(scope)
        if scope.cancelled_caught:
            self.counters.exchange_timeouts += 1
            self._streams.drop(peer)
            log.debug("%s exchange with %s timed out after %.1fs", protocol, peer, timeout)
        return ok, result, scope.cancelled_caught

    @staticmethod
    async def _finish(stream: Any, ok: bool) -> None:
        """Close (or reset) under its own shield: an outer deadline may already have passed."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
            try:
                await (stream.close() if ok else stream.reset())
            except Exception:
                pass

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

        ok, _, timed_out = await self._exchange(
            peer, wire.ANNOUNCE_PROTOCOL, timeout, body, reuse=True
        )
        if ok:
            self.counters.announce_streams += 1
            self.counters.records_sent += len(keys)
            self._mark_ok(peer)
        else:
            self.counters.announce_failures += 1
            self._mark_failed(peer, timed_out)
            self._covered.discard(peer)  # the tick re-sends its whole share when it is back
        return ok

    async def _handle_announce(self, stream: Any) -> None:
        assert self.dht is not None
        peer = stream.muxed_conn.peer_id
        timeout = self.options.inbound_read_timeout
        failed = True
        try:
            # The sender speaks shoal's DHT: it belongs in our routing table.
            await self.dht.add_peer(peer, skip_server_mode_check=True)
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
            await self._finish(stream, ok=not failed)

    def _apply(self, peer: ID, msg: wire.Announce) -> int:
        """Write (or drop) the sender's records straight into the DHT's provider store."""
        assert self.dht is not None
        store = self.dht.provider_store.providers
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
            ip = _ip_of(addr)
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

    # ----------------------------------------------------------------- lookup

    async def find_providers(
        self,
        key: bytes,
        limit: int,
        emit: Callable[[PeerInfo], None],
        use_local: bool = True,
    ) -> int:
        """Call `emit` for up to `limit` distinct providers other than us, first found first.

        Queries run in the node's background nursery: returning early (limit reached, caller
        cancelled) never interrupts an exchange, which finishes within its own deadline.
        """
        assert self.dht is not None and self.peer_id is not None and self._bg is not None
        opts = self.options
        self.counters.lookups += 1
        seen: set[ID] = {self.peer_id}
        held: list[PeerInfo] = []  # providers we know are failing: offered last
        found = 0

        def offer(info: PeerInfo) -> bool:
            nonlocal found
            if provider_ip(info) is None:
                return found >= limit  # no address a registry client could use
            if info.peer_id not in seen and found < limit:
                seen.add(info.peer_id)
                if self._is_failed(info.peer_id):
                    held.append(info)
                else:
                    emit(info)
                    found += 1
            return found >= limit

        if limit <= 0:
            return 0
        if use_local:
            local = self.dht.provider_store.get_providers(key)
            if any(info.peer_id != self.peer_id for info in local):
                self.counters.lookup_local_hits += 1
            for info in local:
                if offer(info):
                    return found

        candidates = self.dht.routing_table.find_local_closest_peers(key, opts.replication)
        if len(candidates) < opts.replication:
            candidates += [p for p in self.host.get_connected_peers() if p not in candidates]
        known = {p for p in candidates if p != self.peer_id}
        target = keyspace_point(key)
        now = trio.current_time()

        def rank() -> list[ID]:
            # Failing peers last, else closest first; only the `replication` closest known
            # are worth asking: that is where records are stored.
            order = sorted(
                known,
                key=lambda p: (self._is_failed(p, now), keyspace_point(p.to_bytes()) ^ target),
            )
            return order[: opts.replication]

        ranked = rank()
        whole = self._table_is_whole()  # then no walk is needed (see `lookup_whole_answers`)
        answers = 0
        queried: set[ID] = set()
        done: set[ID] = set()  # answered or failed, in this lookup
        slow: list[ID] = []  # timed out, in this lookup
        retried = False
        send, recv = trio.open_memory_channel[tuple[ID, Any]](math.inf)
        inflight = with_providers = quiet = 0

        async def query(peer: ID) -> None:
            result = await self._get_providers(peer, key)
            try:
                send.send_nowait((peer, result))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the lookup already returned

        def launch(want: int) -> None:
            nonlocal inflight
            for peer in ranked:
                if inflight >= want:
                    return
                if peer not in queried:
                    queried.add(peer)
                    inflight += 1
                    assert self._bg is not None
                    self._bg.start_soon(query, peer)

        try:
            # One query first; more join when it is slow (hedging) or after each answer
            # without enough providers, up to `lookup_parallel` at once.
            launch(1)
            while inflight:
                with trio.move_on_after(opts.lookup_hedge_delay) as waited:
                    peer, result = await recv.receive()
                if waited.cancelled_caught:
                    launch(min(inflight + 1, opts.lookup_parallel))
                    continue
                inflight -= 1
                done.add(peer)
                if result is TIMED_OUT:
                    slow.append(peer)
                if result is None or result is TIMED_OUT:
                    launch(min(inflight + 1, opts.lookup_parallel))  # replace the failed one
                    if not inflight and found == 0 and slow and not retried:
                        # Everyone asked timed out: more likely this node stalled (a busy
                        # machine) than the whole cluster; ask those once more.
                        retried = True
                        queried.difference_update(slow)
                        launch(opts.lookup_parallel)
                    continue
                providers, closer = result
                if any(offer(info) for info in providers):
                    return found
                answers += 1
                with_providers += bool(providers)
                fresh = [p for p in closer if p != self.peer_id and p not in known]
                known.update(fresh)
                whole = whole and not fresh
                if whole and answers >= opts.lookup_whole_answers:
                    break
                closest = rank() if fresh else ranked
                quiet = quiet + 1 if closest == ranked else 0
                ranked = closest
                # A holder returns every provider it stores, so a few holders that answered
                # tell the whole story (fewer than `limit` exist). A walk that no longer gets
                # closer, with the closest few all asked, has met the holders (or there are
                # none: a miss) without asking all `replication` of them.
                nearest = ranked[: opts.lookup_quiet_answers]
                if with_providers >= opts.lookup_enough_answers or (
                    quiet >= opts.lookup_quiet_answers and all(p in done for p in nearest)
                ):
                    break
                launch(1 if whole else opts.lookup_parallel)  # else widen, as Kademlia does
        finally:
            send.close()
            recv.close()
        for info in held:
            if found >= limit:
                break
            emit(info)
            found += 1
        return found

    async def _get_providers(self, peer: ID, key: bytes) -> Any:
        """One GET_PROVIDERS exchange within the per-peer deadline: (providers, closer peers),
        TIMED_OUT, or None on any other failure."""
        self.counters.lookup_queries += 1
        return await self._query(peer, key, Message.MessageType.GET_PROVIDERS)

    async def _query(self, peer: ID, key: bytes, kind: int) -> Any:
        """One GET_PROVIDERS or FIND_NODE exchange on a pooled stream; see _get_providers."""
        request = Message()
        request.type = kind  # type: ignore[assignment]
        request.key = key
        payload = request.SerializeToString()

        async def body(stream: Any) -> Any:
            await stream.write(wire.encode_uvarint(len(payload)) + payload)
            response = Message()
            response.ParseFromString(await wire.read_message(stream, MAX_DHT_RESPONSE))
            if response.type != kind:
                raise ValueError(f"unexpected response type {response.type}")
            return response

        # A global cap on queries in flight: on an overloaded machine extra queries would
        # only push every exchange past its deadline and trigger yet more queries.
        async with self._query_limiter:
            ok, response, timed_out = await self._exchange(
                peer, self.options.protocol_id, self.options.lookup_peer_timeout, body, reuse=True
            )
        if not ok:
            self.counters.lookup_query_failures += 1
            self._mark_failed(peer, timed_out)
            return TIMED_OUT if timed_out else None
        self._mark_ok(peer)
        return self._parse_providers(response)

    def _parse_providers(self, response: Any) -> tuple[list[PeerInfo], list[ID]]:
        providers: list[PeerInfo] = []
        for proto in response.providerPeers:
            try:
                addrs = [Multiaddr(raw) for raw in proto.addrs]
                providers.append(PeerInfo(ID(proto.id), addrs))
            except Exception:
                continue
        closer: list[ID] = []
        peerstore = self.host.get_peerstore()
        for proto in response.closerPeers:
            try:
                peer = ID(proto.id)
                addrs = [Multiaddr(raw) for raw in proto.addrs]
            except Exception:
                continue
            if addrs and peer != self.peer_id:
                # Lets the walk dial peers it has not met yet.
                peerstore.add_addrs(peer, addrs, 3600)
            closer.append(peer)
        return providers, closer
