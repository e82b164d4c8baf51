"""The node's own content store as a Source."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from shoal.content.model import ContentKind, Delivery, Descriptor, SourceKind
from shoal.oci.digest import Digest
from shoal.oci.names import Reference


class LocalStore(Protocol):
    """What shoal needs from the node's content store (containerd, or memory in tests)."""

    async def image_target(self, name: str) -> Descriptor | None: ...

    async def content_size(self, digest: Digest) -> int | None: ...

    def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]: ...

    def content_path(self, digest: Digest) -> str | None:
        """The blob's file, whole and immutable, when the store lives on this disk."""
        ...


@dataclass
class LocalBlob:
    """Not verified: containerd's files are re-hashed on every response."""

    store: LocalStore
    digest: Digest
    size: int
    source: SourceKind = SourceKind.LOCAL

    def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        return self.store.read(self.digest, start, end)

    def delivery(self) -> Delivery:
        return Delivery(local_file=self.store.content_path(self.digest))


class LocalSource:
    name = SourceKind.LOCAL

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    async def resolve(self, ref: Reference) -> Descriptor | None:
        name = ref.image_name
        return await self.store.image_target(name) if name else None

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> LocalBlob | None:
        size = await self.store.content_size(digest)
        return None if size is None else LocalBlob(self.store, digest, size)
