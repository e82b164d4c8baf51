"""Upstream fetches shared by the whole cluster: about one download per blob.

Three parts make a rollout on N nodes cost about one upstream download per blob:

1. Single flight on a node: a Spool keeps one Fetch per digest; every request joins it.
2. In-flight sharing: a node advertises a digest the moment its upstream fetch starts, and
   serves the bytes received so far to anyone (InFlightSource, by sendfile() as they land), so
   later misses find it through the DHT.
3. A designated fetcher: nodes that miss a blob at the same moment (before any advertisement
   can help) all pick the same node by rendezvous hashing over the cluster members they know,
   and ask that node to fetch (FETCH_HEADER). It fetches once and streams to all of them. If it
   cannot be reached, a node fetches for itself. For a blob of an image manifest this node
   fetched lately, the hash is of the manifest's digest: one node fetches the whole image, in
   manifest order (imageorder.py), and is told so as soon as the manifest is known here.
   Otherwise the hash is of the blob's digest.

Manifests are small and not shared this way; tags are resolved by the tag policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from shoal.imageorder import ImageParts, OrderedFetches
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.peers import PeerSource
from shoal.registry.app import FETCH_HEADER
from shoal.routing.base import Peer, Router
from shoal.sources import Blob, Descriptor
from shoal.spool import Fetch, Spool, SpoolBlob
from shoal.upstream import UpstreamSource
from shoal.upstream.blobs import MemoryBlob

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
        fetch = self.start(digest, blob)
        if fetch is None:
            log.warning("spool full: %s streams from %s unshared", digest, blob.source)
            return blob
        return SpoolBlob(fetch, blob.source)

    def start(self, digest: Digest, blob: Blob) -> Fetch | None:
        """The spool's Fetch of `digest` copying `blob`, advertised; None when the spool is full."""
        known = self.spool.get(digest)
        fetch = self.spool.start(digest, blob)
        if fetch is None or fetch is known:
            return fetch
        if fetch.task is not None:
            fetch.task.add_done_callback(lambda _: self._withdraw_if_failed(fetch))
        # Peers find it while it arrives. Not awaited: an announcement can take seconds under
        # load, and the request that started the fetch (maybe a peer's) must not wait for it.
        self.background(self.router.advertise([str(digest)]))
        return fetch

    async def needed(self, ref: Reference, digest: Digest) -> bool:
        """Whether nobody has `digest`: neither this node's containerd nor any peer."""
        held = self.spool.held_locally
        if held is not None and await held(digest):
            return False
        async for _ in self.router.lookup(str(digest), limit=1):
            return False
        return True

    def _withdraw_if_failed(self, fetch: Fetch) -> None:
        if fetch.error is not None:
            self.background(self.router.withdraw([str(fetch.digest)]))

    def background(self, call: Coroutine[Any, Any, None]) -> None:
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
        ordered: OrderedFetches | None = None,
    ) -> None:
        """`ordered` (shared by a node's fetchers): fetch images in manifest order."""
        self.upstream = upstream
        self.spooler = spooler
        self.router = router
        self.peers = peers
        self.me = me
        self.delegate = delegate
        self.ordered = ordered
        self.images = None if ordered is None else ordered.images
        self._told: dict[Digest, asyncio.Future[None]] = {}  # designated nodes told of images

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return await self.upstream.resolve(ref)

    async def find(self, ref: Reference, digest: Digest, kind: str) -> Blob | None:
        if self.upstream.endpoint(ref.registry) is None:
            return None  # not mirrored: containerd goes to the registry itself
        if kind == "manifest":
            return await self._manifest(ref, digest)
        running = self.spooler.running(digest)
        if running is not None:
            return running
        image = None if self.images is None else self.images.image_of(digest)
        chosen = self._designated(digest if image is None else image.manifest)
        if chosen is None and image is not None and self.ordered is not None:
            await self.ordered.start(ref, image)
            running = self.spooler.running(digest)
            if running is not None:
                return running
        elif chosen is not None and self.delegate:
            # Streamed straight through: spooling a second copy on every node cost more disk
            # and CPU than it saved (bench/rollout.py).
            if image is not None:
                await self._tell(chosen, ref, image)
            blob = await self.peers.find_at([chosen], ref, digest, {FETCH_HEADER: "1"}, patience=20)
            if blob is not None:
                return blob
            log.info("designated fetcher %s of %s unavailable; fetching here", chosen, digest)
        source = await self.upstream.find(ref, digest, kind)
        return None if source is None else await self.spooler.copy(digest, source)

    def _designated(self, key: Digest) -> Peer | None:
        """The node that fetches `key` for the cluster, or None when it is this one."""
        me = self.me()
        if me is None:
            return None
        members = [p for p in self.router.members() if p.id != me.id]
        chosen = designated(key, [me, *members])
        return None if chosen.id == me.id else chosen

    async def _manifest(self, ref: Reference, digest: Digest) -> Blob | None:
        """A manifest from upstream. An image manifest is remembered, and its blobs are from
        now on fetched in order: here, or by the designated node, which is told at once."""
        if self.images is None:
            return await self.upstream.find(ref, digest, "manifest")
        where = (ref.registry, ref.repository)
        known = self.images.get(digest, where)
        if known is not None:  # immutable under its digest, and verified when fetched
            return MemoryBlob(known.body, self.upstream.name)
        blob = await self.images.once(
            where, digest, lambda: self.upstream.find(ref, digest, "manifest")
        )
        if not isinstance(blob, MemoryBlob) or self.images.get(digest, where) is not None:
            return blob  # not an image manifest, or learned by whoever fetched it first
        image = self.images.learn(digest, blob.data, where)
        self._told.pop(digest, None)  # a fresh pull: tell the designated node again
        if image is not None and self.ordered is not None:
            chosen = self._designated(digest)
            if chosen is None:
                self.spooler.background(self.ordered.start(ref, image))
            elif self.delegate:
                self.spooler.background(self._tell(chosen, ref, image))
        return blob

    async def _tell(self, chosen: Peer, ref: Reference, image: ImageParts) -> None:
        """Asks the designated node for the image's manifest as its fetcher, once: it learns the
        image's blobs and starts fetching them in order (or finds it has them)."""
        told = self._told.get(image.manifest)
        if told is None:
            told = asyncio.ensure_future(self._ask_manifest(chosen, ref, image.manifest))
            self._told[image.manifest] = told
            if len(self._told) > 1024:
                self._told.pop(next(iter(self._told)))
        await asyncio.shield(told)

    async def _ask_manifest(self, chosen: Peer, ref: Reference, manifest: Digest) -> None:
        try:
            answer = await self.peers.find_at(
                [chosen], ref, manifest, {FETCH_HEADER: "1"}, kind="manifest", patience=20
            )
        except Exception as exc:  # it then fetches blob by blob, as asked
            log.warning("telling %s of image %s failed: %r", chosen, manifest, exc)
            return
        if answer is None:
            log.info("designated fetcher %s of image %s unavailable", chosen, manifest)
