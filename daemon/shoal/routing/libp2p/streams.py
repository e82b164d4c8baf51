"""Idle outbound libp2p streams, kept for the next exchange with the same peer and protocol."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.peer.id import ID


class StreamPool:
    """Opening a stream costs more than a query itself (yamux SYN/ACK, two multistream round
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
