"""Access applied to Sources: what each asker may be answered from, and what answers teach.

`Withheld` wraps this node's own content. Towards peers (and containerd of other nodes sent here
by a redirect) it answers shareable content only. Towards this node's containerd it answers
blobs, but no manifest or tag that is not shareable: containerd then asks the registry itself,
with the pod's credentials, so the registry decides and the kubelet's credential re-check
reaches it. A withheld object is a miss, never an error: nothing tells a peer it exists.

`Witness` wraps sources whose answers prove content public: the upstream client without
credentials, and peers (which share only what they may).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shoal.content.memory import MemoryBlob
from shoal.content.model import Blob, ContentKind, Descriptor, Source, SourceKind
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.sources.chain import SourceChain, TagResolver
from shoal.tenancy.access import Access
from shoal.tenancy.refusals import Refusals
from shoal.upstream import UpstreamSource
from shoal.upstream.allowlist import Endpoint
from shoal.upstream.errors import UpstreamDenied, UpstreamError

log = logging.getLogger("shoal.tenancy")

DENIED_FOR = 60.0


class Withheld:
    def __init__(
        self, source: Source, access: Access, refused: Refusals, *, to_peers: bool
    ) -> None:
        self.source = source
        self.access = access
        self.refusals = refused
        self.to_peers = to_peers

    @property
    def name(self) -> SourceKind:
        return self.source.name

    async def resolve(self, ref: Reference) -> Descriptor | None:
        name = ref.image_name
        if name is None or not self.access.tag_ok(name):
            self._withheld(name, "tag")
            return None
        return await self.source.resolve(ref)

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        if kind == "manifest":
            ok = self.access.manifest_ok(ref.registry, ref.repository, digest)
        else:
            ok = not self.to_peers or self.access.blob_ok(digest)
        if not ok:
            self._withheld(str(digest), kind)
            return None
        return await self.source.find(ref, digest, kind)

    def _withheld(self, key: str | None, kind: str) -> None:
        reason = None if key is None else self.access.withheld(key)
        if reason is None:
            return  # not held here at all: an ordinary miss
        whom = "a peer" if self.to_peers else "this node's containerd (it asks the registry)"
        self.refusals.refused(reason, f"{kind} withheld from {whom}")


class Witness:
    """A peer source whose answers are recorded as shareable."""

    def __init__(self, source: Source, access: Access) -> None:
        self.source = source
        self.access = access

    @property
    def name(self) -> SourceKind:
        return self.source.name

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return await self.source.resolve(ref)

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        blob = await self.source.find(ref, digest, kind)
        if blob is not None:
            self.access.learned(ref, digest, kind, "peer")
        return blob


class AnonymousUpstream:
    """The upstream client without credentials, recording what it was served: what a registry
    serves to anyone is public. Everything the cluster fetches for itself goes through it.

    A repository whose tag the registry refused to tell is not asked again for DENIED_FOR
    seconds: the blobs of a private image then cost no anonymous attempt each, and `denied`
    lets the cluster's fetch step aside at once (containerd goes to the registry itself)."""

    name = SourceKind.UPSTREAM

    def __init__(
        self,
        upstream: UpstreamSource,
        access: Access,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.access = access
        self.clock = clock
        self._denied: dict[tuple[str | None, str], float] = {}  # (registry, repository) -> until

    def endpoint(self, registry: str | None) -> Endpoint | None:
        return self.upstream.endpoint(registry)

    async def resolve(self, ref: Reference) -> Descriptor | None:
        try:
            return await self.lookup(ref)
        except UpstreamError as exc:
            log.warning("cannot resolve %s upstream: %s", ref.image_name, exc)
            return None

    async def lookup(self, ref: Reference) -> Descriptor | None:
        try:
            return await self.upstream.lookup(ref)
        except UpstreamDenied:
            if len(self._denied) >= 1024:
                now = self.clock()
                self._denied = {k: t for k, t in self._denied.items() if t > now}
            self._denied[(ref.registry, ref.repository)] = self.clock() + DENIED_FOR
            raise

    def last_known(self, ref: Reference) -> tuple[Descriptor, float] | None:
        return self.upstream.last_known(ref)

    def denied(self, ref: Reference) -> bool:
        """Whether the registry refused anonymous clients this repository a moment ago."""
        until = self._denied.get((ref.registry, ref.repository))
        return until is not None and until > self.clock()

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        if self.denied(ref):
            return None
        blob = await self.upstream.find(ref, digest, kind)
        if blob is not None:
            self.access.learned(ref, digest, kind, "upstream")
        return blob

    async def manifest(self, ref: Reference, digest: Digest) -> MemoryBlob | None:
        if self.denied(ref):
            return None
        blob = await self.upstream.manifest(ref, digest)
        if blob is not None:
            self.access.learned(ref, digest, "manifest", "upstream")
        return blob


class Unless:
    """A Source that steps aside (answers None at once) while `skip(ref)` holds."""

    def __init__(self, source: Source, skip: Callable[[Reference], bool]) -> None:
        self.source = source
        self.skip = skip

    @property
    def name(self) -> SourceKind:
        return self.source.name

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return None if self.skip(ref) else await self.source.resolve(ref)

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        return None if self.skip(ref) else await self.source.find(ref, digest, kind)


def gated_chain(
    *,
    local: Source,
    inflight: Source,
    peers: Source,
    fetch_for_containerd: Source,
    fetch_for_peers: Source,
    access: Access,
    refused: Refusals,
    tags: TagResolver | None = None,
    private: Source | None = None,
    denied: Callable[[Reference], bool] | None = None,
) -> SourceChain:
    """Who may be answered from what: this node's containerd from its own content (no manifest
    or tag it may not share), in-flight fetches, peers, the cluster's upstream fetch and, last,
    `private` (the upstream with credentials); a peer from shareable content only; a peer that
    chose this node to fetch for the cluster also from upstream, anonymously. In-flight fetches
    are anonymous, so shareable (`credentialed` never spools). `denied`: repositories the
    anonymous upstream was just refused, for which containerd's cluster fetch steps aside."""
    to_containerd = Withheld(local, access, refused, to_peers=False)
    to_peers = Withheld(local, access, refused, to_peers=True)
    if denied is not None:
        fetch_for_containerd = Unless(fetch_for_containerd, denied)
    return SourceChain(
        [to_containerd, inflight, Witness(peers, access), fetch_for_containerd],
        peer_sources=[to_peers, inflight],
        fetch_sources=[to_peers, inflight, fetch_for_peers],
        tags=tags,
        private=private,
    )
