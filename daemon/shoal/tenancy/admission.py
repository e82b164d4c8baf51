"""Who may ask: the pull API's first middleware (README, "Private images stay private").

- A request with a peer signature (`tokens.AUTH_HEADER`) is a peer's, or a designated-fetch
  request when the signed mark says so; a bad or stale signature is refused (403).
- A request with a redirect capability (`tokens.CAP_QUERY`) is containerd of another node, sent
  here for the one object the capability names; answered as a peer's request.
- Otherwise only this node's containerd may ask: a request from loopback (or a configured local
  address). Anything else, peer marks without a signature included, is refused (401).

Refusals cost no lookup, no disk read and no upstream request. `P2P_INFO_PATH` stays open: it
tells this node's libp2p peer ID and addresses, which are of no use without the cluster key
(the DHT is a private network keyed by it).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

from aiohttp import web

from shoal.oci.errors import Denied, Unauthorized
from shoal.registry.middleware import Handler, error_response
from shoal.registry.protocol import FETCH_HEADER, FETCH_QUERY, P2P_INFO_PATH, PEER_HEADER, Asker
from shoal.tenancy import refusals
from shoal.tenancy.keys import ClusterKey
from shoal.tenancy.refusals import Refusals
from shoal.tenancy.tokens import (
    AUTH_HEADER,
    CAP_QUERY,
    Refused,
    Target,
    check_capability,
    check_signature,
)

ASKER_KEY = web.RequestKey("shoal.asker", Asker)
SENDER_KEY = web.RequestKey("shoal.sender", str)  # the node ID a peer request was signed by
_OPEN_PATHS = frozenset({P2P_INFO_PATH})
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> list[_Network]:
    """`--local-addresses` entries: addresses or CIDR networks."""
    return [ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry.strip()]


def is_local(remote: str | None, extra: Iterable[_Network] = ()) -> bool:
    """Loopback (127.0.0.0/8, ::1, IPv4-mapped loopback) or one of `extra`."""
    if not remote:
        return False
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or any(ip in net for net in extra)


class Admission:
    def __init__(
        self,
        key: ClusterKey | None,
        me: Callable[[], str],
        *,
        local_networks: Iterable[_Network] = (),
        refused: Refusals | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`key`: None admits this node's containerd only. `me`: this node's ID, which
        capabilities are bound to."""
        self.key = key
        self.me = me
        self.local_networks = list(local_networks)
        self.refusals = refused or Refusals()
        self.clock = clock

    def admit(self, request: web.Request) -> Asker:
        """Who is asking; raises Refused."""
        headers, query = request.headers, request.query
        ns = query.get("ns")
        signature = headers.get(AUTH_HEADER)
        if signature is not None:
            fetch = FETCH_HEADER in headers
            target = Target(request.method, request.path, ns, fetch)
            sender = check_signature(self._key().peer_requests, signature, target, self.clock())
            if sender != "-":
                request[SENDER_KEY] = sender
            return Asker.FETCH if fetch else Asker.PEER
        capability = query.get(CAP_QUERY)
        if capability is not None:
            fetch = FETCH_QUERY in query
            target = Target("GET", request.path, ns, fetch)
            key = self._key().capabilities
            check_capability(key, capability, self.me(), target, self.clock())
            return Asker.FETCH if fetch else Asker.PEER
        if PEER_HEADER in headers or FETCH_HEADER in headers or FETCH_QUERY in query:
            raise Refused(401, refusals.UNSIGNED_PEER, "peer requests must be signed")
        if is_local(request.remote, self.local_networks):
            return Asker.CONTAINERD
        raise Refused(401, refusals.UNAUTHENTICATED, "only this node and its peers may ask")

    def _key(self) -> ClusterKey:
        if self.key is None:
            raise Refused(403, refusals.NO_CLUSTER_KEY, "this node has no cluster key")
        return self.key

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _OPEN_PATHS:
            return await handler(request)
        try:
            request[ASKER_KEY] = self.admit(request)
        except Refused as refusal:
            kind = next((k for k in ("manifest", "blob") if f"/{k}s/" in request.path), "other")
            self.refusals.refused(refusal.reason, f"{request.method} {kind} from {request.remote}")
            error = (Unauthorized if refusal.status == 401 else Denied)(str(refusal))
            return error_response(error, request)
        return await handler(request)


def admitted(request: web.Request) -> Asker:
    """Who the admission middleware found this request to be from."""
    asker = request.get(ASKER_KEY)
    if asker is None:
        raise RuntimeError("request was not admitted")  # the app always installs Admission
    return asker


def sender_of(request: web.Request) -> str | None:
    """The node that signed this request, if it is a peer's shoal (not containerd)."""
    return request.get(SENDER_KEY)
