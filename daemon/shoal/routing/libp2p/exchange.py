"""One request/response with a peer over a libp2p stream, and which peers keep failing.

Every exchange runs shielded under its own deadline, on pooled streams, because cancelling
libp2p I/O half-way breaks the connection (docs/libp2p.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from shoal.routing import wire
from shoal.routing.libp2p.host import Host
from shoal.routing.libp2p.stats import Counters
from shoal.routing.libp2p.streams import StreamPool

log = logging.getLogger("shoal.routing.node")  # its name before the split, kept for log readers

MAX_DHT_RESPONSE = 4 * 1024 * 1024
TIMED_OUT = object()  # a query that hit its deadline (as opposed to failing outright)

T = TypeVar("T")


@dataclass
class _Failure:
    until: float
    backoff: float
    count: int = 0


class Failures:
    """Peers whose exchanges failed lately, skipped for a while (backing off, doubling)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.options = host.options
        self._failures: dict[ID, _Failure] = {}

    def is_failed(self, peer: ID, now: float | None = None, strikes: int = 2) -> bool:
        """Whether `peer` failed `strikes` times in a row and is still backing off.

        One failure is not enough to shun a peer: on a busy node live peers time out too."""
        failure = self._failures.get(peer)
        return (
            failure is not None
            and failure.count >= strikes
            and failure.until > (now or trio.current_time())
        )

    def mark_failed(self, peer: ID, timed_out: bool) -> None:
        opts = self.options
        now = trio.current_time()
        prev = self._failures.get(peer)
        if prev is None:
            backoff, count = opts.failure_backoff, 1
        else:
            backoff, count = min(prev.backoff * 2, opts.failure_backoff_max), prev.count + 1
        self._failures[peer] = _Failure(now + backoff, backoff, count)
        if count >= 3 and not timed_out and self.host.dht is not None:
            # Refused three times in a row: gone. It is re-added when it talks to us again.
            # Timeouts do not count here: on a starved machine live peers time out too.
            self.host.dht.routing_table.remove_peer(peer)

    def mark_ok(self, peer: ID) -> None:
        self._failures.pop(peer, None)

    def forget_old(self, now: float) -> None:
        """Forget failures long past so the table does not grow without bound."""
        for peer in [p for p, f in self._failures.items() if f.until + 3600 < now]:
            del self._failures[peer]


class Exchanges:
    def __init__(self, host: Host, failures: Failures, counters: Counters) -> None:
        self.host = host
        self.failures = failures
        self.counters = counters
        opts = host.options
        self.streams = StreamPool(per_peer=2, max_idle=opts.inbound_read_timeout * 0.4)
        self.running: set[trio.CancelScope] = set()
        self._queries = trio.CapacityLimiter(opts.lookup_max_inflight)

    async def exchange(
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
        Connection-level writes are shielded as well (see internals.shield_yamux_writes), so
        even the deadline firing mid-exchange leaves the connection usable.
        """
        ok, result = False, None
        with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout) as scope:
            self.running.add(scope)
            for _attempt in range(2):
                stream = self.streams.take(peer, protocol) if reuse else None
                pooled = stream is not None
                try:
                    if stream is None:
                        stream = await self.host.host.new_stream(peer, [TProtocol(protocol)])
                    result = await body(stream)
                    ok = True
                except Exception as exc:
                    log.debug("%s exchange with %s failed: %r", protocol, peer, exc)
                keep = ok and reuse and self.streams.give(peer, protocol, stream)
                if stream is not None and not keep:
                    await finish(stream, ok)
                if ok or not pooled:
                    break
        self.running.discard(scope)
        if scope.cancelled_caught:
            self.counters.exchange_timeouts += 1
            self.streams.drop(peer)
            log.debug("%s exchange with %s timed out after %.1fs", protocol, peer, timeout)
        return ok, result, scope.cancelled_caught

    def hurry(self, within: float) -> None:
        """Exchanges are shielded from cancellation: bring their own deadlines forward (on
        stop, so that stopping takes a second, not an announce's 20)."""
        soon = trio.current_time() + within
        for scope in self.running:
            scope.deadline = min(scope.deadline, soon)

    async def close_idle(self) -> None:
        for stream in self.streams.expired():
            await finish(stream, ok=True)

    async def query(self, peer: ID, key: bytes, kind: Message.MessageType) -> Any:
        """One GET_PROVIDERS or FIND_NODE exchange on a pooled stream within the per-peer
        deadline: (providers, closer peers), TIMED_OUT, or None on any other failure."""
        request = Message()
        request.type = kind
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
        opts = self.host.options
        async with self._queries:
            ok, response, timed_out = await self.exchange(
                peer, opts.protocol_id, opts.lookup_peer_timeout, body, reuse=True
            )
        if not ok:
            self.counters.lookup_query_failures += 1
            self.failures.mark_failed(peer, timed_out)
            return TIMED_OUT if timed_out else None
        self.failures.mark_ok(peer)
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
        peerstore = self.host.host.get_peerstore()
        for proto in response.closerPeers:
            try:
                peer = ID(proto.id)
                addrs = [Multiaddr(raw) for raw in proto.addrs]
            except Exception:
                continue
            if addrs and peer != self.host.peer_id:
                # Lets the walk dial peers it has not met yet.
                peerstore.add_addrs(peer, addrs, 3600)
            closer.append(peer)
        return providers, closer


async def finish(stream: Any, ok: bool) -> None:
    """Close (or reset) under its own shield: an outer deadline may already have passed."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
        try:
            await (stream.close() if ok else stream.reset())
        except Exception:
            pass
