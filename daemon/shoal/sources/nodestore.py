"""The node's containerd as the LocalStore the registry serves from."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from shoal.containerd.imagecache import ImageClient
from shoal.content.model import Descriptor
from shoal.oci.digest import Digest


class ContainerdStore:
    """Image records come from containerd's Images service; blob bytes from the content directory
    on disk when it is readable (much faster than gRPC Read), else over gRPC."""

    def __init__(self, client: ImageClient) -> None:
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
