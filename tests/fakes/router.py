"""An in-memory Router: every MemoryRouter on one MemoryNetwork sees the others."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from shoal.routing.base import NodeInfo, Peer


class MemoryNetwork:
    def __init__(self) -> None:
        self.providers: dict[str, dict[str, Peer]] = {}
        self.members: dict[str, Peer] = {}


class MemoryRouter:
    def __init__(self, network: MemoryNetwork, peer: Peer, ready_alone: bool = False) -> None:
        self._net = network
        self.peer = peer
        self._ready_alone = ready_alone
        self._started = False

    async def start(self) -> None:
        self._net.members[self.peer.id] = self.peer
        self._started = True

    async def stop(self) -> None:
        self._net.members.pop(self.peer.id, None)
        for holders in self._net.providers.values():
            holders.pop(self.peer.id, None)
        self._started = False

    async def advertise(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._net.providers.setdefault(key, {})[self.peer.id] = self.peer

    async def withdraw(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._net.providers.get(key, {}).pop(self.peer.id, None)

    async def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]:
        holders = [p for pid, p in self._net.providers.get(key, {}).items() if pid != self.peer.id]
        for peer in holders[:limit]:
            yield peer

    def members(self) -> list[Peer]:
        return [p for pid, p in self._net.members.items() if pid != self.peer.id]

    def ready(self) -> bool:
        return self._started and (self._ready_alone or len(self._net.members) > 1)

    def node_info(self) -> NodeInfo:
        return NodeInfo(self.peer.id)

    def stats(self) -> dict[str, float]:
        return {}
