"""Who this node knows: the cluster members it reports, and looking for more."""

from __future__ import annotations

import trio
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID

from shoal.routing.libp2p.exchange import TIMED_OUT, Exchanges
from shoal.routing.libp2p.host import ip_of
from shoal.routing.libp2p.stats import NodeStats
from shoal.routing.options import is_unspecified

# Seconds a peer stays a cluster member (for choosing designated fetchers) after last seen.
MEMBER_TTL = 60.0


class Membership:
    def __init__(self, exchanges: Exchanges) -> None:
        self.exchanges = exchanges
        self.host, self.failures = exchanges.host, exchanges.failures
        self.options = self.host.options
        self.stats = NodeStats()
        self._seen: dict[str, tuple[str, float]] = {}  # peer ID -> (IP, last seen), see sample
        self._conn_ids: dict[ID, frozenset[int]] = {}
        self._next_refresh = 0.0
        self._refresh_interval = self.options.tick_interval
        self._last_rt_size = -1
        self._table: frozenset[ID] = frozenset()
        self._table_since: float | None = None  # None until the first sample (an empty store)

    def dht_peers(self) -> list[ID]:
        """Announce targets: known DHT servers, less those that failed twice in a row lately
        (they get their share from the tick once they answer again)."""
        now = trio.current_time()
        table = self.host.kad.routing_table
        return [p for p in table.get_peer_ids() if not self.failures.is_failed(p, now)]

    def sample(self, keys: int) -> None:
        """Refreshes `stats` (`keys`: how many this node announces)."""
        dht, host = self.host.kad, self.host.host
        store = host.get_peerstore()
        now = trio.current_time()
        table = frozenset(dht.routing_table.get_peer_ids())
        if table != self._table or self._table_since is None:
            self._table, self._table_since = table, now
        peers = set(table) | set(host.get_connected_peers())
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
            table_settled=int(self.table_is_settled(now)),
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
        if out:  # they re-send us their records too
            self._table_since = trio.current_time()
        return out

    def table_is_settled(self, now: float) -> bool:
        """Whole, with the same peers (none of them reconnected) for `lookup_settled_after`
        seconds: this node stores every record a walk could find (see options)."""
        settle, since = self.options.lookup_settled_after, self._table_since
        return (
            settle >= 0
            and since is not None
            and bool(self._table)
            and now - since >= settle
            and self.table_is_whole()
            # a peer that joined since the last tick's sample unsettles it at once
            and frozenset(self.host.kad.routing_table.get_peer_ids()) == self._table
        )

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
