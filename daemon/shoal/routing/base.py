"""The router the daemon wires: libp2p implements it (tests use an in-memory one).

Each consumer declares the part it needs (a provider lookup for peers, advertise/withdraw for
the catalog, the members for choosing a designated fetcher); `Router` is all of them together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Peer:
    """A node that holds a key. `address` is where its registry API answers (host:port)."""

    id: str
    address: str


@dataclass(frozen=True)
class NodeInfo:
    """This node's routing identity: its peer ID and the multiaddrs peers dial (with /p2p/<id>)."""

    id: str
    addrs: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "addrs": list(self.addrs)}


class Router(Protocol):
    """Keys are plain strings: `sha256:<hex>` for content, `<registry>/<repo>:<tag>` for tags."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def advertise(self, keys: Iterable[str]) -> None:
        """Announce that this node holds `keys` (idempotent; re-announcing refreshes)."""
        ...

    async def withdraw(self, keys: Iterable[str]) -> None:
        """Stop announcing `keys`; peers stop seeing this node for them within one record TTL."""
        ...

    def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]:
        """Yield up to `limit` distinct peers (never this node) holding `key`, first found first."""
        ...

    def ready(self) -> bool:
        """True once connected to at least one peer (or configured to run alone)."""
        ...

    def members(self) -> list[Peer]:
        """The other nodes this one knows (its routing table), for choosing a designated
        fetcher; nodes with the same view choose alike."""
        ...

    def node_info(self) -> NodeInfo:
        """Served at `shoal.registry.protocol.P2P_INFO_PATH` so other nodes can bootstrap from
        this node's IP alone."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters (names without `_total`) and gauges of the router's work, for /metrics."""
        ...
