"""The client side of peer authentication: what every request to a peer's shoal carries, and
the capability in every URL this node sends its containerd to (`tokens`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from shoal.registry.protocol import FETCH_QUERY, peer_headers
from shoal.tenancy.keys import ClusterKey
from shoal.tenancy.tokens import AUTH_HEADER, CAP_QUERY, Target, mint_capability, sign


class PeerSigner:
    def __init__(
        self, key: ClusterKey, me: Callable[[], str], clock: Callable[[], float] = time.time
    ) -> None:
        """`me`: this node's ID (the libp2p peer ID; empty until routing is up)."""
        self.key = key
        self.me = me
        self.clock = clock

    def headers(self, method: str, path: str, ns: str | None, fetch: bool) -> dict[str, str]:
        """The marks and signature of a request to a peer (`fetch`: as its designated fetcher)."""
        target = Target(method, path, ns, fetch)
        marks = peer_headers(fetch)
        marks[AUTH_HEADER] = sign(self.key.peer_requests, target, self.me() or "-", self.clock())
        return marks

    def redirect_query(self, holder: str, path: str, ns: str | None, fetch: bool) -> dict[str, str]:
        """Query parameters that let this node's containerd fetch `path` from `holder`."""
        target = Target("GET", path, ns, fetch)
        query = {FETCH_QUERY: "1"} if fetch else {}
        query[CAP_QUERY] = mint_capability(self.key.capabilities, holder, target, self.clock())
        return query
