"""Blobs this node is fetching or has just fetched, as a Source: readable while they arrive."""

from __future__ import annotations

from typing import Protocol

from shoal.content.model import Blob, ContentKind, Descriptor, SourceKind
from shoal.oci.digest import Digest
from shoal.oci.names import Reference


class Running(Protocol):
    def running(self, digest: Digest) -> Blob | None:
        """The spool's blob of `digest` while its fetch runs or just finished, else None."""
        ...


class InFlightSource:
    name = SourceKind.INFLIGHT

    def __init__(self, fetches: Running) -> None:
        self.fetches = fetches

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return None

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        return self.fetches.running(digest)
