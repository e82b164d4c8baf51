"""Other nodes' shoal as a Source: found through the router, fetched over HTTP.

A request to a peer carries PEER_HEADER, so the peer answers from its own content only and never
forwards (no loops). Slow peers are hedged: when the first has not answered its headers within
`hedge_after`, the next is asked too and the first answer wins. A body that breaks midway is
resumed with Range from the next peer. A digest no peer holds is remembered briefly, so a burst
of misses costs one lookup; the registry then answers 404 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
from yarl import URL

from shoal.oci.digest import Digest
from shoal.oci.errors import RegistryError
from shoal.oci.names import Reference
from shoal.registry.app import FETCH_HEADER, FETCH_QUERY, PEER_HEADER, PEER_QUERY
from shoal.routing.base import Peer, Router
from shoal.sources import READ_BUFSIZE, Descriptor

log = logging.getLogger("shoal.peers")

T = TypeVar("T")
_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError)
_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


@dataclass
class PeerSettings:
    max_peers: int = 3  # providers asked per key
    hedge_after: float = 0.25  # seconds before asking the next peer too
    header_timeout: float = 2.0  # a peer that has not answered by then is skipped
    read_timeout: float = 5.0  # silence between body chunks that counts as a failure
    negative_ttl: float = 2.0  # how long "no peer has it" is remembered
    # Send containerd to the peer for a blob body (a 307) rather than relay it: the bytes then
    # cross this node's CPU once, in containerd, instead of three times.
    redirect: bool = True
    redirect_min: int = 1024 * 1024  # smaller bodies are relayed: cheaper than a 2nd connection


class PeerSource:
    name = "peer"

    def __init__(self, router: Router, settings: PeerSettings | None = None) -> None:
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
        if key is None or self._missed(key):
            return None
        peers = await self._peers(key)
        path = f"/v2/{ref.repository}/manifests/{ref.tag}"
        answer = await self._first(peers, "HEAD", path, ref.registry, {"Accept": _ACCEPT})
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

    async def find(self, ref: Reference, digest: Digest, kind: str) -> PeerBlob | None:
        key = str(digest)
        if self._missed(key):
            return None
        blob = await self.find_at(await self._peers(key), ref, digest, kind=kind)
        if blob is None:
            self._miss(key)
        return blob

    async def find_at(
        self,
        peers: list[Peer],
        ref: Reference,
        digest: Digest,
        headers: dict[str, str] | None = None,
        *,
        kind: str = "blob",
        patience: float | None = None,
    ) -> PeerBlob | None:
        """Content from the first of `peers` to answer a HEAD for it; `headers` go with every
        request (e.g. asking a peer to fetch from upstream, which needs more `patience`)."""
        kind_path = "manifests" if kind == "manifest" else "blobs"
        path = f"/v2/{ref.repository}/{kind_path}/{digest}"
        extra = {"Accept": _ACCEPT, **(headers or {})}
        answer = await self._first(peers, "HEAD", path, ref.registry, extra, patience)
        if answer is None:
            return None
        first, resp = answer
        try:
            size = int(resp.headers["Content-Length"])
        except (KeyError, ValueError):
            return None
        # The peer that answered first goes first; the others stay as fallbacks.
        order = [first, *(p for p in peers if p != first)]
        return PeerBlob(self, order, path, ref.registry, size, headers=dict(headers or {}))

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

    def _url(
        self, peer: Peer, path: str, ns: str | None, extra: dict[str, str] | None = None
    ) -> str:
        query = {"ns": ns} if ns else {}
        return str(URL(f"http://{peer.address}{path}").with_query({**query, **(extra or {})}))

    async def _first(
        self,
        peers: list[Peer],
        method: str,
        path: str,
        ns: str | None,
        headers: dict[str, str],
        patience: float | None = None,
    ) -> tuple[Peer, aiohttp.ClientResponse] | None:
        """The first peer to answer 200/206, hedging slow ones; its response is released."""

        # A peer asked to fetch from upstream first asks upstream itself: allow it `patience`.
        timeout = None if patience is None else aiohttp.ClientTimeout(sock_read=patience)

        async def ask(peer: Peer) -> aiohttp.ClientResponse:
            resp = await self.session.request(
                method,
                self._url(peer, path, ns),
                headers={PEER_HEADER: "1", **headers},
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


async def hedged(
    peers: list[Peer],
    ask: Callable[[Peer], Awaitable[T]],
    hedge_after: float,
    per_peer: float,
) -> tuple[Peer, T] | None:
    """Asks peers in order, starting the next one whenever the running ones are slower than
    `hedge_after` (or one failed); the first success wins and the rest are cancelled."""
    pending: dict[asyncio.Task[T], Peer] = {}
    queue = list(peers)
    deadline = time.monotonic() + per_peer * max(1, len(peers))
    try:
        while queue or pending:
            if queue:
                peer = queue.pop(0)
                task = asyncio.ensure_future(asyncio.wait_for(ask(peer), per_peer))
                pending[task] = peer
            wait = hedge_after if queue else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                peer = pending.pop(task)
                if task.exception() is None:
                    return peer, task.result()
                log.debug("peer %s: %s", peer.address, task.exception())
            if not queue and not done and time.monotonic() >= deadline:
                return None
        return None
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task


@dataclass
class PeerBlob:
    owner: PeerSource
    peers: list[Peer]
    url_path: str
    ns: str | None
    size: int
    source: str = "peer"
    verified = False  # a peer is never trusted
    headers: dict[str, str] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)

    @property
    def path(self) -> None:
        return None  # never a local file

    def location(self) -> str | None:
        """The first peer's URL for this blob, when the settings send containerd there."""
        settings = self.owner.settings
        if not settings.redirect or self.size < settings.redirect_min:
            return None
        marks = {PEER_QUERY: "1", **({FETCH_QUERY: "1"} if FETCH_HEADER in self.headers else {})}
        return self.owner._url(self.peers[0], self._blob_path, self.ns, marks)

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
            headers = {PEER_HEADER: "1", **self.headers}
            if pos > 0 or end < self.size:
                headers["Range"] = f"bytes={pos}-{end - 1}"
            url = self.owner._url(peer, self._blob_path, self.ns)
            self.tried.append(peer.address)
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
