"""Who this node knows: dialling peers, the cluster members it reports, and finding more."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from multiaddr import Multiaddr

from shoal.routing.libp2p.exchange import TIMED_OUT, Exchanges, Failures
from shoal.routing.libp2p.host import Host, ip_of
from shoal.routing.libp2p.stats import NodeStats
from shoal.routing.options import is_unspecified

log = logging.getLogger("shoal.routing.node")  # its name before the split, kept for log readers

# Seconds a peer stays a cluster member (for choosing designated fetchers) after last seen.
MEMBER_TTL = 60.0


class Membership:
    def __init__(self, host: Host, failures: Failures, exchanges: Exchanges) -> None:
        self.host = host
        self.options = host.options
        self.failures = failures
        self.exchanges = exchanges
        self.stats = NodeStats()
        self._seen: dict[str, tuple[str, float]] = {}  # peer ID -> (IP, last seen), see sample
        self._conn_ids: dict[ID, frozenset[int]] = {}
        self._next_refresh = 0.0
        self._refresh_interval = self.options.tick_interval
        self._last_rt_size = -1

    def dht_peers(self) -> list[ID]:
        """Announce targets: known DHT servers, less those that failed twice in a row lately
        (they get their share from the tick once they answer again)."""
        now = trio.current_time()
        table = self.host.kad.routing_table
        return [p for p in table.get_peer_ids() if not self.failures.is_failed(p, now)]

    async def connect(
        self,
        addrs: Iterable[str],
        timeout: float = 5.0,
        limit: int | None = None,
        skip_known: bool = False,
    ) -> int:
        """Dial `/…/p2p/<id>` multiaddrs (at most `limit` peers, optionally only ones not in
        the routing table), add them to the routing table, then look ourselves up."""
        dht, me, host = self.host.kad, self.host.me, self.host.host
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
        return connected

    def sample(self, keys: int) -> None:
        """Refreshes `stats` (`keys`: how many this node announces)."""
        dht, host = self.host.kad, self.host.host
        store = host.get_peerstore()
        now = trio.current_time()
        peers = set(dht.routing_table.get_peer_ids()) | set(host.get_connected_peers())
        for peer in peers:
            try:
                ip = next((i for i in map(ip_of, store.addrs(peer)) if i), None)
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
            routing_table=dht.routing_table.size(),
            connected=len(host.get_connected_peers()),
            keys=keys,
            stored_records=dht.provider_store.size(),
            members=tuple(sorted(members)),
        )

    def reconnected(self) -> list[ID]:
        """Peers whose connections were all replaced since the last tick: they may have
        restarted with an empty store."""
        out = []
        for peer, conns in self.host.host.get_network().get_connections_map().items():
            ids = frozenset(id(conn) for conn in conns)
            seen = self._conn_ids.get(peer)
            if seen is not None and ids and seen.isdisjoint(ids):
                out.append(peer)
            if ids:
                self._conn_ids[peer] = ids
        return out

    def table_is_whole(self) -> bool:
        """Fewer peers known than `replication`: each of our records went to all of them, and
        theirs to us (see announce.Announcer.targets), unless someone names a peer we do not
        know."""
        return self.host.kad.routing_table.size() < self.options.replication

    async def maybe_refresh(self, now: float) -> None:
        """Look ourselves up again soon after the routing table changes, then less and less often.

        Peers that joined at the same time can miss each other in their first self-lookup; the
        stock refresh only comes every 10 minutes.
        """
        dht = self.host.kad
        size = dht.routing_table.size()
        if size != self._last_rt_size:
            self._last_rt_size = size
            self._refresh_interval = self.options.tick_interval
            self._next_refresh = min(self._next_refresh, now + self._refresh_interval)
        if size == 0 or now < self._next_refresh:
            return
        with trio.move_on_after(10):
            if await self._may_find_more():
                await dht.peer_routing.find_closest_peers_network(self.host.me.to_bytes())
        self._refresh_interval = min(self._refresh_interval * 2, self.options.reannounce_interval)
        self._next_refresh = trio.current_time() + self._refresh_interval

    async def _may_find_more(self) -> bool:
        """Whether a refresh walk could find peers we do not know.

        The stock walk opens a new stream to every peer it asks, and in a small network it asks
        them all. While the table holds fewer than `replication` peers, the closest few are
        asked first over pooled streams: when none of them names a peer we do not know, there
        is nobody to find (as in the lookup, see `lookup_whole_answers`).
        """
        opts = self.options
        table = self.host.kad.routing_table
        if not self.table_is_whole():
            return True
        me = self.host.me
        own = me.to_bytes()
        known = set(table.get_peer_ids())
        answers = 0
        for peer in table.find_local_closest_peers(own, opts.replication):
            if answers >= opts.lookup_whole_answers:
                break
            result = await self.exchanges.query(peer, own, Message.MessageType.FIND_NODE)
            if result is None or result is TIMED_OUT:
                continue
            answers += 1
            _, closer = result
            if any(p != me and p not in known for p in closer):
                return True
        return answers == 0  # nobody answered: let the walk try its own way
