"""The upstream registries as the chain's last Source: fetched once for the whole cluster.

How (README, "Upstream, once per cluster"): a blob goes through this node's spool, shared while
it arrives (`shoal.fetch.sharing`); the node chosen to fetch it (`shoal.fetch.designate`) is
asked to, unless that is this node; an image manifest fetched here makes its blobs follow in
manifest order (`shoal.fetch.imageorder`), and its designated node is told at once. Manifests
themselves are small and fetched by whoever asks; tags are the tag policy's (`tags`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from shoal.content.memory import MemoryBlob
from shoal.content.model import Blob, ContentKind, Descriptor, SourceKind
from shoal.fetch.designate import Designation
from shoal.fetch.imageorder import ImageParts, OrderedFetches
from shoal.fetch.sharing import SharedFetches
from shoal.herd.serving import Herd
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.routing.base import Peer
from shoal.sources.peers import PeerUnreachable
from shoal.upstream.allowlist import Endpoint

log = logging.getLogger("shoal.fetcher")

UNREACHABLE_TRIES = 3  # designated fetchers asked in turn before this node fetches itself


class Upstream(Protocol):
    """What the fetcher asks of the upstream registries (shoal.upstream.UpstreamSource)."""

    def endpoint(self, registry: str | None) -> Endpoint | None: ...

    async def resolve(self, ref: Reference) -> Descriptor | None: ...

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None: ...

    async def manifest(self, ref: Reference, digest: Digest) -> MemoryBlob | None: ...


class FetchingPeer(Protocol):
    """How the fetcher asks a designated node (shoal.sources.peers.PeerSource)."""

    async def fetch_at(
        self, peer: Peer, ref: Reference, digest: Digest, kind: ContentKind
    ) -> Blob | None:
        """None when the node answered it has no such content (it asked upstream); raises
        PeerUnreachable when it did not answer."""
        ...


class UpstreamFetcher:
    """The upstream as a Source, through the spool and, with `delegate`, the designated node."""

    name = SourceKind.UPSTREAM

    def __init__(
        self,
        upstream: Upstream,
        sharing: SharedFetches,
        designation: Designation,
        peers: FetchingPeer,
        *,
        delegate: bool,
        ordered: OrderedFetches | None = None,
    ) -> None:
        """`delegate`: ask the designated node rather than fetch here (not for a peer that
        already chose this node); `ordered` (shared by a node's fetchers): fetch images in
        manifest order."""
        self.upstream = upstream
        self.sharing = sharing
        self.designation = designation
        self.peers = peers
        self.delegate = delegate
        self.ordered = ordered
        self.images = None if ordered is None else ordered.images
        self._told: dict[Digest, asyncio.Future[None]] = {}  # designated nodes told of images

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return await self.upstream.resolve(ref)

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        if self.upstream.endpoint(ref.registry) is None:
            return None  # not mirrored: containerd goes to the registry itself
        if kind == "manifest":
            return await self._manifest(ref, digest)
        running = self.sharing.running(digest)
        if running is not None:
            return running
        chosen, image = self.designation.for_blob(digest)
        if chosen is None and image is not None and self.ordered is not None:
            await self.ordered.start(ref, image)
            running = self.sharing.running(digest)
            if running is not None:
                return running
        elif chosen is not None and self.delegate:
            # Streamed straight through: spooling a second copy on every node cost more disk
            # and CPU than it saved (bench/rollout.py).
            answered, blob = await self._from_fetcher(chosen, ref, digest, self.peers, image)
            if answered:
                # Its miss is the cluster's: it asked upstream, and asking again here would
                # wait on the same upstream (a hung one: its deadline) once more.
                return blob
        source = await self.upstream.find(ref, digest, kind)
        return None if source is None else await self.sharing.copy(digest, source)

    async def rescue(
        self, ref: Reference, digest: Digest, peers: FetchingPeer, herd: Herd | None = None
    ) -> Blob | None:
        """The rest of a blob whose peer download lost every holder (its fetcher died, say):
        from the designated fetcher (the next in line when it is gone), or upstream when
        that is this node. Never this node's own running fetch, which is what is rescued:
        `peers` asks without the spool."""
        if self.upstream.endpoint(ref.registry) is None:
            return None
        chosen = self.designation.for_blob(digest).node
        if chosen is not None:
            answered, blob = await self._from_fetcher(chosen, ref, digest, peers, None)
            if answered:
                return blob
        blob = await self.upstream.find(ref, digest, "blob")
        if herd is not None:
            herd.received(str(digest))  # fed by the registry now: it serves peers again
        return blob

    async def _from_fetcher(
        self,
        chosen: Peer,
        ref: Reference,
        digest: Digest,
        peers: FetchingPeer,
        image: ImageParts | None,
    ) -> tuple[bool, Blob | None]:
        """(True, its answer) from the designated fetcher, passing over one that does not
        answer to the next in the same order; (False, None) when this node is next in line."""
        for _ in range(UNREACHABLE_TRIES):
            if image is not None:
                await self._tell(chosen, ref, image)
            try:
                return True, await peers.fetch_at(chosen, ref, digest, "blob")
            except PeerUnreachable:
                log.info("designated fetcher %s of %s unreachable", chosen, digest)
                self.designation.unreachable(chosen)
            next_choice = self.designation.for_blob(digest).node
            if next_choice is None:
                break
            chosen = next_choice
        return False, None

    async def _manifest(self, ref: Reference, digest: Digest) -> Blob | None:
        """A manifest from upstream. An image manifest is remembered, and its blobs are from
        now on fetched in order: here, or by the designated node, which is told at once."""
        if self.images is None:
            return await self.upstream.manifest(ref, digest)
        where = (ref.registry, ref.repository)
        known = self.images.get(digest, where)
        if known is not None:  # immutable under its digest, and verified when fetched
            return MemoryBlob(known.body, SourceKind.UPSTREAM)
        blob = await self.images.once(where, digest, lambda: self.upstream.manifest(ref, digest))
        if blob is None or self.images.get(digest, where) is not None:
            return blob  # none, or learned by whoever fetched it first
        image = self.images.learn(digest, blob.data, where)
        self._told.pop(digest, None)  # a fresh pull: tell the designated node again
        if image is not None and self.ordered is not None:
            chosen = self.designation.of(digest)
            if chosen is None:
                self.sharing.background(self.ordered.start(ref, image))
            elif self.delegate:
                self.sharing.background(self._tell(chosen, ref, image))
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
            answer = await self.peers.fetch_at(chosen, ref, manifest, "manifest")
        except PeerUnreachable:
            answer = None
        except Exception as exc:  # it then fetches blob by blob, as asked
            log.warning("telling %s of image %s failed: %r", chosen, manifest, exc)
            return
        if answer is None:
            log.info("designated fetcher %s of image %s unavailable", chosen, manifest)
