"""containerd's image records for the request path, kept in memory while nothing changed.

A HEAD by tag asks containerd's Images service for the record; doing so on every request costs
a gRPC round trip each time. Records (and the absence of one) are kept here while containerd's
event stream is up and says nothing changed: any image event or content deletion drops them
all, and so does a break of the stream, after which nothing is kept until the catalog has
resynced over a live subscription again (`shoal.catalog`). A change becomes visible once its
event arrives, as it does for the catalog.

While containerd does not answer (or does not within `timeout` seconds, or `shoal.health` found
it down), records and content info are "not here" (None), at once: a request goes on to peers
and upstream. `shoal.health` says once that containerd is down; requests do not.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from shoal.containerd.events import CONTENT_CREATE
from shoal.containerd.model import ContainerdUnavailable, ContentInfo, Event, Image
from shoal.oci.digest import Digest

log = logging.getLogger("shoal.containerd")

T = TypeVar("T")


class ImageClient(Protocol):
    """The containerd calls the node store makes (shoal.containerd.ContainerdClient, or this
    cache in front of it)."""

    async def get_image(self, name: str) -> Image | None: ...

    async def info(self, digest: str | Digest) -> ContentInfo | None: ...

    def blob_path(self, digest: str | Digest) -> str | None: ...

    def open_blob(
        self, digest: str | Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]: ...


class ImageCache:
    """An ImageClient in front of another; `changed`, `stream_down` and `stream_up` are the
    catalog's event-stream callbacks."""

    def __init__(
        self,
        client: ImageClient,
        max_entries: int = 4096,
        *,
        timeout: float = 5.0,
        available: Callable[[], bool] = lambda: True,
    ) -> None:
        self.client = client
        self.max_entries = max_entries
        self.timeout = timeout
        self.available = available
        self._images: OrderedDict[str, Image | None] = OrderedDict()
        self._live = False  # the event stream is up and the catalog resynced over it
        self._generation = 0  # bumped by every change: answers asked before one are not kept
        self.hits = 0

    async def get_image(self, name: str) -> Image | None:
        if self._live and name in self._images:
            self._images.move_to_end(name)
            self.hits += 1
            return self._images[name]
        generation = self._generation
        try:
            image = await self._ask(self.client.get_image(name))
        except (ContainerdUnavailable, TimeoutError) as exc:
            log.debug("image %s: %r", name, exc)
            return None
        if self._live and generation == self._generation:
            self._images[name] = image
            if len(self._images) > self.max_entries:
                self._images.popitem(last=False)
        return image

    async def info(self, digest: str | Digest) -> ContentInfo | None:
        try:
            return await self._ask(self.client.info(digest))
        except (ContainerdUnavailable, TimeoutError) as exc:
            log.debug("info %s: %r", digest, exc)
            return None

    async def _ask(self, call: Awaitable[T]) -> T:
        if not self.available():
            if asyncio.iscoroutine(call):
                call.close()
            raise ContainerdUnavailable("containerd is down (health check)")
        async with asyncio.timeout(self.timeout):
            return await call

    def blob_path(self, digest: str | Digest) -> str | None:
        return self.client.blob_path(digest)

    def open_blob(
        self, digest: str | Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        return self.client.open_blob(digest, offset, length)

    # -- the event stream ------------------------------------------------------------------------

    def changed(self, event: Event) -> None:
        if event.topic != CONTENT_CREATE:  # new content (containerd 2.1+) changes no record
            self._drop()

    def stream_down(self) -> None:
        self._live = False
        self._drop()

    def stream_up(self) -> None:
        self._drop()
        self._live = True

    def _drop(self) -> None:
        self._generation += 1
        self._images.clear()
