"""Other nodes' shoal as a Source: found through the router, fetched over HTTP.

A request to a peer carries the peer protocol's marks (`shoal.registry.protocol`), so the peer
answers from its own content only and never forwards. Slow peers are hedged (`hedge`): when the
first has not answered its headers within `hedge_after`, the next is asked too and the first
answer wins. A body that breaks midway is resumed with Range from the next peer. A digest no
peer holds is remembered briefly, so a burst of misses costs one lookup; the registry then
answers 404 at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from shoal.content.model import READ_BUFSIZE, ContentKind, Delivery, Descriptor, SourceKind
from shoal.observe.middleware import note_peer
from shoal.oci.digest import Digest
from shoal.oci.errors import RegistryError
from shoal.oci.names import Reference
from shoal.registry.protocol import content_path, peer_headers, peer_url, redirect_marks
from shoal.routing.base import Peer
from shoal.sources.hedge import hedged

log = logging.getLogger("shoal.peers")

# A peer asked to fetch from upstream first asks upstream itself: it gets this long to answer.
FETCHER_PATIENCE = 20.0

_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError)
_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


class ProviderLookup(Protocol):
    """What peers need of the router: who holds a key."""

    def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]: ...


@dataclass
class PeerSettings:
    max_peers: int = 3  # providers asked per key
    hedge_after: float = 0.25  # seconds before asking the next peer too
    header_timeout: float = 2.0  # a peer that has not answered by then is skipped
    read_timeout: float = 5.0  # silence between body chunks that counts as a failure
    negative_ttl: float = 2.0  # how long "no peer has it" is remembered


class PeerSource:
    name = SourceKind.PEER

    def __init__(self, router: ProviderLookup, settings: PeerSettings | None = None) -> None:
        self.router = router
        self.settings = settings or PeerSettings()
        self._session: aiohttp.ClientSession | None = None
        self._misses: dict[str, float] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            s = self.settings
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    sock_connect=min(1.0, s.header_timeout), sock_read=s.read_timeout
                ),
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
        answer = await self._first(peers, "HEAD", path, ref.registry, peer_headers(False))
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

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> PeerBlob | None:
        key = str(digest)
        if self._missed(key):
            return None
        blob = await self._find_at(await self._peers(key), ref, digest, kind=kind)
        if blob is None:
            self._miss(key)
        return blob

    async def fetch_at(
        self, peer: Peer, ref: Reference, digest: Digest, kind: ContentKind
    ) -> PeerBlob | None:
        """Content from `peer`, asked to fetch it from upstream for the cluster (it is the
        designated fetcher, shoal.fetch.designate)."""
        return await self._find_at([peer], ref, digest, fetch=True, kind=kind)

    async def _find_at(
        self,
        peers: list[Peer],
        ref: Reference,
        digest: Digest,
        *,
        fetch: bool = False,
        kind: ContentKind = "blob",
    ) -> PeerBlob | None:
        """Content from the first of `peers` to answer a HEAD for it; with `fetch`, asked of
        them as the cluster's fetcher."""
        path = content_path(ref.repository, kind, digest)
        patience = FETCHER_PATIENCE if fetch else None
        answer = await self._first(peers, "HEAD", path, ref.registry, peer_headers(fetch), patience)
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
        return PeerBlob(self, order, path, ref.registry, size, fetch)

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
        return [p async for p in self.router.lookup(key, self.settings.max_peers)]

    async def _first(
        self,
        peers: list[Peer],
        method: str,
        path: str,
        ns: str | None,
        marks: dict[str, str],
        patience: float | None = None,
    ) -> tuple[Peer, aiohttp.ClientResponse] | None:
        """The first peer to answer 200/206, hedging slow ones; its response is released."""

        # A peer asked to fetch from upstream first asks upstream itself: allow it `patience`.
        timeout = None if patience is None else aiohttp.ClientTimeout(sock_read=patience)

        async def ask(peer: Peer) -> aiohttp.ClientResponse:
            resp = await self.session.request(
                method,
                peer_url(peer.address, path, ns),
                headers={"Accept": _ACCEPT, **marks},
                allow_redirects=False,
                timeout=timeout,
            )
            resp.release()
            if resp.status not in (200, 206):
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message="peer miss"
                )
            return resp

        s = self.settings
        return await hedged(peers, ask, s.hedge_after, patience or s.header_timeout)


@dataclass
class PeerBlob:
    """Not verified: a peer is never trusted. Another node serves it (`delivery().location`)."""

    owner: PeerSource
    peers: list[Peer]
    url_path: str
    ns: str | None
    size: int
    fetch: bool = False  # asked of the peer as the cluster's designated fetcher
    source: SourceKind = SourceKind.PEER

    def delivery(self) -> Delivery:
        marks = redirect_marks(self.fetch)
        return Delivery(location=peer_url(self.peers[0].address, self._blob_path, self.ns, marks))

    @property
    def _blob_path(self) -> str:
        # Peers serve any content they hold under /blobs/, with Range; manifests included.
        return self.url_path.replace("/manifests/", "/blobs/")

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end), resumed from the next peer with Range if one fails midway."""
        pos = start
        last_error: BaseException | None = None
        for peer in self.peers:
            if pos >= end:
                return
            headers = peer_headers(self.fetch)
            if pos > 0 or end < self.size:
                headers["Range"] = f"bytes={pos}-{end - 1}"
            url = peer_url(peer.address, self._blob_path, self.ns)
            try:
                async with self.owner.session.get(url, headers=headers) as resp:
                    if resp.status not in (200, 206) or (pos > 0 and resp.status != 206):
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status, message="peer refused"
                        )
                    async for chunk in resp.content.iter_chunked(1024 * 1024):
                        chunk = chunk[: end - pos]
                        pos += len(chunk)
                        yield chunk
                        if pos >= end:
                            return
                raise ConnectionError(f"peer {peer.address} ended the body at {pos} of {end}")
            except _ERRORS as exc:
                last_error = exc
                log.warning(
                    "peer %s failed at byte %d: %s; trying the next", peer.address, pos, exc
                )
        if pos < end:
            raise ConnectionError(f"no peer served {self.url_path} past byte {pos}: {last_error}")
