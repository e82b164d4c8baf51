"""Upstream fetches shared by the whole cluster: about one download per blob.

Three parts make a rollout on N nodes cost about one upstream download per blob:

1. Single flight on a node: a Spool keeps one Fetch per digest; every request joins it.
2. In-flight sharing: a node advertises a digest the moment its upstream fetch starts, and
   serves the bytes received so far to anyone (InFlightSource, by sendfile() as they land), so
   later misses find it through the DHT.
3. A designated fetcher per digest: nodes that miss a digest at the same moment (before any
   advertisement can help) all pick the same node by rendezvous hashing of the digest over the
   cluster members they know, and ask that node to fetch (FETCH_HEADER). It fetches once and
   streams to all of them. If it cannot be reached, a node fetches for itself.

Manifests are small and not shared this way; tags are resolved by the tag policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.peers import PeerSource
from shoal.registry.app import FETCH_HEADER
from shoal.routing.base import Peer, Router
from shoal.sources import Blob, Descriptor
from shoal.spool import Fetch, Spool, SpoolBlob
from shoal.upstream import UpstreamSource

log = logging.getLogger("shoal.fetcher")


def designated(digest: Digest, candidates: list[Peer]) -> Peer:
    """Rendezvous (highest random weight) hashing: every node that knows the same members picks
    the same one, and a member joining or leaving moves only its own share of digests."""
    return max(candidates, key=lambda p: hashlib.sha256(f"{p.id}/{digest}".encode()).digest())


class InFlightSource:
    """Blobs this node is fetching or has just fetched, readable while they arrive."""

    name = "inflight"

    def __init__(self, spooler: Spooler) -> None:
        self.spooler = spooler

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return None

    async def find(self, ref: Reference, digest: Digest, kind: str) -> Blob | None:
        return self.spooler.running(digest)


class Spooler:
    """Copies blobs found elsewhere through the spool: each is fetched once on this node,
    advertised while it arrives, and served by sendfile() to containerd and to peers."""

    def __init__(self, spool: Spool, router: Router) -> None:
        self.spool = spool
        self.router = router
        self._background: set[asyncio.Future[None]] = set()

    def running(self, digest: Digest) -> Blob | None:
        fetch = self.spool.get(digest)
        return None if fetch is None else SpoolBlob(fetch, fetch.origin)

    async def copy(self, digest: Digest, blob: Blob) -> Blob:
        fetch = self.spool.start(digest, blob)
        if fetch is None:
            log.warning("spool full: %s streams from %s unshared", digest, blob.source)
            return blob
        if fetch.task is not None:
            fetch.task.add_done_callback(lambda _: self._withdraw_if_failed(fetch))
        # Peers find it while it arrives. Not awaited: an announcement can take seconds under
        # load, and the request that started the fetch (maybe a peer's) must not wait for it.
        self._background_call(self.router.advertise([str(digest)]))
        return SpoolBlob(fetch, blob.source)

    def _withdraw_if_failed(self, fetch: Fetch) -> None:
        if fetch.error is not None:
            self._background_call(self.router.withdraw([str(fetch.digest)]))

    def _background_call(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class UpstreamFetcher:
    """The upstream as a Source, through the spool and, with `delegate`, the designated node."""

    name = "upstream"

    def __init__(
        self,
        upstream: UpstreamSource,
        spooler: Spooler,
        router: Router,
        peers: PeerSource,
        me: Callable[[], Peer | None],
        *,
        delegate: bool,
    ) -> None:
        self.upstream = upstream
        self.spooler = spooler
        self.router = router
        self.peers = peers
        self.me = me
        self.delegate = delegate

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return await self.upstream.resolve(ref)

    async def find(self, ref: Reference, digest: Digest, kind: str) -> Blob | None:
        if self.upstream.endpoint(ref.registry) is None:
            return None  # not mirrored: containerd goes to the registry itself
        if kind == "manifest":
            return await self.upstream.find(ref, digest, kind)
        running = self.spooler.running(digest)
        if running is not None:
            return running
        if self.delegate:
            # Streamed straight through: spooling a second copy on every node cost more disk
            # and CPU than it saved (bench/rollout.py).
            blob = await self._via_designated(ref, digest)
            if blob is not None:
                return blob
        source = await self.upstream.find(ref, digest, kind)
        return None if source is None else await self.spooler.copy(digest, source)

    async def _via_designated(self, ref: Reference, digest: Digest) -> Blob | None:
        me = self.me()
        if me is None:
            return None
        members = [p for p in self.router.members() if p.id != me.id]
        chosen = designated(digest, [me, *members])
        if chosen.id == me.id:
            return None
        blob = await self.peers.find_at([chosen], ref, digest, {FETCH_HEADER: "1"}, patience=20)
        if blob is None:
            log.info("designated fetcher %s of %s unavailable; fetching here", chosen, digest)
        return blob
