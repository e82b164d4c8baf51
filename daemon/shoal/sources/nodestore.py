"""The node's containerd as the LocalStore the registry serves from."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Protocol

from shoal.containerd.model import ContentInfo, Image
from shoal.content.model import Descriptor
from shoal.oci.digest import Digest


class StoreClient(Protocol):
    """The containerd calls a store needs (shoal.containerd.ContainerdClient)."""

    async def get_image(self, name: str) -> Image | None: ...

    async def info(self, digest: str | Digest) -> ContentInfo | None: ...

    def blob_path(self, digest: str | Digest) -> str | None: ...

    def open_blob(
        self, digest: str | Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]: ...


class ContainerdStore:
    """Image records come from containerd's Images service; blob bytes from the content directory
    on disk when it is readable (much faster than gRPC Read), else over gRPC."""

    def __init__(self, client: StoreClient) -> None:
        self.client = client

    async def image_target(self, name: str) -> Descriptor | None:
        image = await self.client.get_image(name)
        if image is None:
            return None
        target = image.target
        return Descriptor(target.media_type, Digest.parse(target.digest), target.size)

    async def content_size(self, digest: Digest) -> int | None:
        path = self.client.blob_path(digest)
        if path is not None:
            try:
                return (await asyncio.to_thread(os.stat, path)).st_size
            except FileNotFoundError:
                return None
        info = await self.client.info(digest)
        return None if info is None else info.size

    async def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        async for chunk in self.client.open_blob(digest, start, end - start):
            yield chunk

    def content_path(self, digest: Digest) -> str | None:
        return self.client.blob_path(digest)
