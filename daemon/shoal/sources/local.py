"""The node's own content store as a Source, minus what `shoal.integrity` quarantined."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from shoal.content.model import ContentKind, Delivery, Descriptor, LocalFile, SourceKind
from shoal.integrity.guard import Integrity
from shoal.integrity.identity import FileIdentity
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


class Guard(Protocol):
    """What the local source needs of `shoal.integrity.guard.Integrity`."""

    async def blocks(self, digest: Digest, path: str | None, size: int) -> bool: ...

    def file(self, path: str, digest: Digest, size: int) -> LocalFile: ...

    def mismatch(self, digest: Digest, identity: FileIdentity | None, found_by: str) -> None: ...


@dataclass
class LocalBlob:
    """Not verified: a file is sent unhashed only once its identity is on record as verified
    (`shoal.integrity`); everything else is hashed per response."""

    store: LocalStore
    guard: Guard
    digest: Digest
    size: int
    source: SourceKind = SourceKind.LOCAL

    def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        return self.store.read(self.digest, start, end)

    def delivery(self) -> Delivery:
        path = self.store.content_path(self.digest)
        local = None if path is None else self.guard.file(path, self.digest, self.size)
        return Delivery(local_file=local, on_mismatch=self._mismatch)

    def _mismatch(self) -> None:
        # Found while streaming (a manifest, a small range, or gRPC reads): identity unknown.
        self.guard.mismatch(self.digest, None, "serving")


class LocalSource:
    name = SourceKind.LOCAL

    def __init__(self, store: LocalStore, guard: Guard | None = None) -> None:
        """`guard`: the node's Integrity (default: one in memory, nothing recorded on disk)."""
        self.store = store
        self.guard: Guard = guard if guard is not None else Integrity()

    async def resolve(self, ref: Reference) -> Descriptor | None:
        name = ref.image_name
        return await self.store.image_target(name) if name else None

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> LocalBlob | None:
        size = await self.store.content_size(digest)
        if size is None or await self.guard.blocks(digest, self.store.content_path(digest), size):
            return None
        return LocalBlob(self.store, self.guard, digest, size)
