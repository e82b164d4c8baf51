"""Other nodes' shoal as a Source: found through the router, fetched over HTTP.

A request to a peer carries the peer protocol's marks (`shoal.registry.protocol`), signed
(`RequestSigner`), so the peer answers from its own content only and never forwards; a URL
containerd is redirected to carries a capability for that one object. Holders are asked in the
order `holders` keeps (known-bad ones never, slow ones last); slow peers are hedged (`hedge`):
when the first has not answered its headers within `hedge_after`, the next is asked too and the
first answer wins. The body is a `download.PeerDownload`: each holder under a progress deadline,
resumed with Range from the next one. A digest no peer holds is remembered briefly, so a burst
of misses costs one lookup; the registry then answers 404 at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from shoal.content.model import READ_BUFSIZE, ContentKind, Descriptor, SourceKind
from shoal.herd.serving import Herd
from shoal.observe.middleware import note_peer
from shoal.oci.digest import Digest
from shoal.oci.errors import RegistryError
from shoal.oci.names import Reference
from shoal.registry.protocol import content_path, peer_url
from shoal.routing.base import Peer
from shoal.sources.download import Deadlines, PeerDownload, RequestSigner
from shoal.sources.hedge import hedged
from shoal.sources.holders import Holders
from shoal.sources.liveness import from_live_peer

log = logging.getLogger("shoal.peers")

# A peer asked to fetch from upstream first asks upstream itself: it gets this long to answer.
FETCHER_PATIENCE = 20.0

_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


class PeerUnreachable(ConnectionError):
    """The peer gave no answer at all (as opposed to answering that it has nothing)."""


class ProviderLookup(Protocol):
    """What peers need of the router: who holds a key."""

    def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]: ...


@dataclass
class PeerSettings:
    max_peers: int = 3  # providers asked per key
    # Once one holder is known, the lookup gets this long to name more: a walk waiting on a
    # stopped node must not hold up every request for the node's whole query deadline.
    lookup_grace: float = 0.25
    hedge_after: float = 0.25  # seconds before asking the next peer too
    negative_ttl: float = 2.0  # how long "no peer has it" is remembered
    deadlines: Deadlines = field(default_factory=Deadlines)  # each holder's answer and body


async def aclose(it: AsyncIterator[object]) -> None:
    """Closes a lookup left early (an async generator): the router stops its walk."""
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


class PeerSource:
    name = SourceKind.PEER

    def __init__(
        self,
        router: ProviderLookup,
        settings: PeerSettings | None = None,
        holders: Holders | None = None,
        *,
        signer: RequestSigner,
        herd: Herd | None = None,
    ) -> None:
        """`herd`: this node's part in spreading a blob as a tree (None: no referrals)."""
        self.router = router
        self.signer = signer
        self.herd = herd
        self.settings = settings or PeerSettings()
        self.holders = holders or Holders()
        self._session: aiohttp.ClientSession | None = None
        self._misses: dict[str, float] = {}

    @property
    def deadlines(self) -> Deadlines:
        return self.settings.deadlines

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            d = self.settings.deadlines
            self._session = aiohttp.ClientSession(
                # Body silence is the download's to judge (it probes before giving up).
                timeout=aiohttp.ClientTimeout(sock_connect=min(1.0, d.header_timeout)),
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=16, ttl_dns_cache=None),
                auto_decompress=False,
                read_bufsize=READ_BUFSIZE,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- Source ----------------------------------------------------------------------------------

    async def resolve(self, ref: Reference) -> Descriptor | None:
        key = ref.image_name  # peers advertise a tag under containerd's image name
        if key is None or ref.tag is None or self._missed(key):
            return None
        peers = await self._peers(key)
        path = content_path(ref.repository, "manifest", ref.tag)
        answer = await self._first(peers, "HEAD", path, ref.registry)
        if answer is None:
            self._miss(key)
            return None
        _, resp = answer
        try:
            digest = Digest.parse(resp.headers.get("Docker-Content-Digest", ""))
            size = int(resp.headers.get("Content-Length", "-1"))
        except (RegistryError, ValueError):
            return None
        media_type = resp.headers.get("Content-Type", "")
        return Descriptor(media_type, digest, size) if size >= 0 and media_type else None

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> PeerDownload | None:
        key = str(digest)
        if self._missed(key):
            return None
        peers = self.holders.order(key, await self._peers(key))
        blob = await self._find_at(peers, ref, digest, kind=kind)
        if blob is None:
            self._miss(key)
        return blob

    async def fetch_at(
        self, peer: Peer, ref: Reference, digest: Digest, kind: ContentKind
    ) -> PeerDownload | None:
        """Content from `peer`, asked to fetch it from upstream for the cluster (it is the
        designated fetcher, shoal.fetch.designate); None when it answered that it cannot or
        sent bad bytes, PeerUnreachable when it did not answer."""
        if self.holders.is_bad(str(digest), peer):
            return None
        answered: list[int] = []
        blob = await self._find_at([peer], ref, digest, fetch=True, kind=kind, answered=answered)
        if blob is None and not answered:
            raise PeerUnreachable(f"designated fetcher {peer.address} did not answer")
        return blob

    async def _find_at(
        self,
        peers: list[Peer],
        ref: Reference,
        digest: Digest,
        *,
        fetch: bool = False,
        kind: ContentKind = "blob",
        answered: list[int] | None = None,
    ) -> PeerDownload | None:
        """Content from the first of `peers` to answer a HEAD for it; with `fetch`, asked of
        them as the cluster's fetcher. `answered` collects the statuses peers answered."""
        path = content_path(ref.repository, kind, digest)
        patience = FETCHER_PATIENCE if fetch else None
        answer = await self._first(peers, "HEAD", path, ref.registry, fetch, patience, answered)
        if answer is None:
            return None
        first, resp = answer
        try:
            size = int(resp.headers["Content-Length"])
        except (KeyError, ValueError):
            return None
        note_peer(first.address, size)
        # The peer that answered first goes first; the others stay as fallbacks.
        order = [first, *(p for p in peers if p != first)]
        return PeerDownload(self, digest, order, path, ref.registry, size, fetch, patience)

    async def more_holders(self, digest: Digest) -> list[Peer]:
        key = str(digest)
        return [p for p in await self._peers(key) if not self.holders.is_bad(key, p)]

    # -- helpers ---------------------------------------------------------------------------------

    def _missed(self, key: str) -> bool:
        expiry = self._misses.get(key)
        if expiry is None:
            return False
        if expiry > time.monotonic():
            return True
        del self._misses[key]
        return False

    def _miss(self, key: str) -> None:
        if len(self._misses) > 10_000:  # bounded: drop the expired, then the oldest
            now = time.monotonic()
            self._misses = {k: v for k, v in self._misses.items() if v > now}
        self._misses[key] = time.monotonic() + self.settings.negative_ttl

    async def _peers(self, key: str) -> list[Peer]:
        found: list[Peer] = []
        lookup = self.router.lookup(key, self.settings.max_peers)
        try:
            async with asyncio.timeout(None) as grace:
                async for peer in lookup:
                    found.append(peer)
                    if grace.when() is None:
                        loop = asyncio.get_running_loop()
                        grace.reschedule(loop.time() + self.settings.lookup_grace)
        except TimeoutError:
            pass  # enough to start with
        finally:
            await aclose(lookup)
        return found

    async def _first(
        self,
        peers: list[Peer],
        method: str,
        path: str,
        ns: str | None,
        fetch: bool = False,
        patience: float | None = None,
        answered: list[int] | None = None,
    ) -> tuple[Peer, aiohttp.ClientResponse] | None:
        """The first peer to answer 200/206, hedging slow ones; its response is released."""

        # A peer asked to fetch from upstream first asks upstream itself: allow it `patience`.
        timeout = None if patience is None else aiohttp.ClientTimeout(sock_read=patience)

        d = self.settings.deadlines

        async def ask(peer: Peer) -> aiohttp.ClientResponse:
            request = self.session.request(
                method,
                peer_url(peer.address, path, ns),
                headers={"Accept": _ACCEPT, **self.signer.headers(method, path, ns, fetch)},
                allow_redirects=False,
                timeout=timeout,
            )
            if patience is None:
                resp = await request
            else:  # patient only with a peer that is alive: a crashed one never answers
                resp = await from_live_peer(request, self.session, peer, d, patience)
            resp.release()
            if answered is not None:
                answered.append(resp.status)
            if resp.status not in (200, 206):
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message="peer miss"
                )
            return resp

        s = self.settings
        answer = await hedged(
            peers, ask, s.hedge_after, patience or s.deadlines.header_timeout,
            slow=lambda peer: self.holders.slow(peer.id),
        )  # fmt: skip
        if answer is not None:
            self.holders.answered(answer[0].id)
        return answer
