"""The node's own content store as a Source, and an in-memory store for tests and benchmarks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.sources import Descriptor

CHUNK = 1024 * 1024


class LocalStore(Protocol):
    """What shoal needs from the node's content store (containerd, or memory in tests)."""

    async def image_target(self, name: str) -> Descriptor | None: ...

    async def content_size(self, digest: Digest) -> int | None: ...

    def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]: ...

    def content_path(self, digest: Digest) -> str | None: ...


@dataclass
class LocalBlob:
    store: LocalStore
    digest: Digest
    size: int
    source: str = "local"
    verified = False  # containerd's files are re-hashed on every response

    def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        return self.store.read(self.digest, start, end)

    @property
    def path(self) -> str | None:
        return self.store.content_path(self.digest)


class LocalSource:
    name = "local"

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    async def resolve(self, ref: Reference) -> Descriptor | None:
        name = ref.image_name
        return await self.store.image_target(name) if name else None

    async def find(self, ref: Reference, digest: Digest, kind: str) -> LocalBlob | None:
        size = await self.store.content_size(digest)
        return None if size is None else LocalBlob(self.store, digest, size)


class MemoryStore:
    """A LocalStore in memory. Bytes are stored as given, so tests can plant corrupt content."""

    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self.images: dict[str, Descriptor] = {}

    def add(self, data: bytes, digest: Digest | None = None) -> Digest:
        digest = digest or Digest.of(data)
        self.blobs[digest] = data
        return digest

    def tag(self, name: str, media_type: str, data: bytes) -> Descriptor:
        desc = Descriptor(media_type, self.add(data), len(data))
        self.images[name] = desc
        return desc

    async def image_target(self, name: str) -> Descriptor | None:
        return self.images.get(name)

    async def content_size(self, digest: Digest) -> int | None:
        data = self.blobs.get(digest)
        return None if data is None else len(data)

    async def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        data = self.blobs[digest]
        for pos in range(start, end, CHUNK):
            yield data[pos : min(end, pos + CHUNK)]

    def content_path(self, digest: Digest) -> str | None:
        return None
