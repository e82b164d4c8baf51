"""The Sources a request may use, in order, by who asks (`shoal.registry.protocol.Asker`).

containerd's requests get every source; a peer's requests only what this node holds, so
requests never loop; a peer that chose this node to fetch for the cluster also gets upstream.
A `private` source (the upstream with configured credentials) answers this node's containerd
only, last, tags included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shoal.content.model import Blob, Descriptor, Source
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.registry.protocol import Asker


class TagResolver(Protocol):
    async def resolve(self, ref: Reference, sources: Sequence[Source]) -> Descriptor | None: ...


async def first_answer(sources: Sequence[Source], ref: Reference) -> Descriptor | None:
    """What the first source that knows `ref`'s tag says it is."""
    for source in sources:
        desc = await source.resolve(ref)
        if desc is not None:
            return desc
    return None


class SourceChain:
    """`sources` for containerd, `peer_sources` for peers (default: the first source),
    `fetch_sources` for a peer's fetch request (default: `peer_sources`); `tags` decides what
    a tag means (default: the first source that knows); `private`, when given, is the last of
    `sources` and also resolves the tags nothing else could."""

    def __init__(
        self,
        sources: Sequence[Source],
        peer_sources: Sequence[Source] | None = None,
        fetch_sources: Sequence[Source] | None = None,
        tags: TagResolver | None = None,
        private: Source | None = None,
    ) -> None:
        self.sources = list(sources) + ([private] if private is not None else [])
        self.peer_sources = list(peer_sources if peer_sources is not None else sources[:1])
        self.fetch_sources = list(fetch_sources if fetch_sources is not None else self.peer_sources)
        self.tags = tags
        self.private = private

    def for_asker(self, asker: Asker) -> list[Source]:
        if asker is Asker.CONTAINERD:
            return self.sources
        return self.fetch_sources if asker is Asker.FETCH else self.peer_sources

    async def resolve(self, sources: Sequence[Source], ref: Reference) -> Descriptor | None:
        shared = [s for s in sources if s is not self.private]
        if self.tags is not None:
            found = await self.tags.resolve(ref, shared)
        else:
            found = await first_answer(shared, ref)
        if found is None and self.private is not None and self.private in sources:
            return await self.private.resolve(ref)
        return found

    @staticmethod
    async def find_blob(sources: Sequence[Source], ref: Reference, digest: Digest) -> Blob | None:
        for source in sources:
            blob = await source.find(ref, digest, "blob")
            if blob is not None:
                return blob
        return None
