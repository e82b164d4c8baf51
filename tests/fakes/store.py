"""In-memory content stores in place of the node's containerd."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from shoal.content.model import Descriptor
from shoal.oci.digest import Digest

CHUNK = 1024 * 1024


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


class FileStore(MemoryStore):
    """Blobs also written to files, so the registry takes its sendfile path."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def add(self, data: bytes, digest: Digest | None = None) -> Digest:
        digest = super().add(data, digest)
        (self.root / digest.hex).write_bytes(data)
        return digest

    async def content_size(self, digest: Digest) -> int | None:
        path = self.root / digest.hex  # the file's size, as the containerd store reads it
        return path.stat().st_size if path.exists() else None

    def content_path(self, digest: Digest) -> str | None:
        path = self.root / digest.hex
        return str(path) if path.exists() else None
