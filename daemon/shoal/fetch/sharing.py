"""Fetches this node runs for the cluster: each blob copied once through the spool, advertised
the moment it starts, and readable by containerd and peers while it arrives."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any, Protocol

from shoal.content.model import Blob
from shoal.fetch.spool import Fetch, Rescue, Spool, SpoolBlob
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.routing.base import Peer

log = logging.getLogger("shoal.fetcher")


class Announcer(Protocol):
    """What sharing needs of the router."""

    async def advertise(self, keys: Iterable[str]) -> None: ...

    async def withdraw(self, keys: Iterable[str]) -> None: ...

    def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]: ...


class SharedFetches:
    def __init__(self, spool: Spool, router: Announcer) -> None:
        self.spool = spool
        self.router = router
        self._background: set[asyncio.Future[None]] = set()

    def running(self, digest: Digest) -> Blob | None:
        fetch = self.spool.get(digest)
        return None if fetch is None else SpoolBlob(fetch, fetch.origin)

    async def copy(self, digest: Digest, blob: Blob, rescue: Rescue | None = None) -> Blob:
        """`blob`, read through the spool (or, when the spool is full, as it is); `rescue`
        offers the rest when `blob` fails midway."""
        fetch = self.start(digest, blob, rescue)
        if fetch is None:
            log.warning("spool full: %s streams from %s unshared", digest, blob.source)
            return blob
        return SpoolBlob(fetch, blob.source)

    def start(self, digest: Digest, blob: Blob, rescue: Rescue | None = None) -> Fetch | None:
        """The spool's Fetch of `digest` copying `blob`, advertised; None when the spool is full."""
        known = self.spool.get(digest)
        fetch = self.spool.start(digest, blob, rescue)
        if fetch is None or fetch is known:
            return fetch
        if fetch.task is not None:
            fetch.task.add_done_callback(lambda _: self._withdraw_if_failed(fetch))
        # Peers find it while it arrives. Not awaited: an announcement can take seconds under
        # load, and the request that started the fetch (maybe a peer's) must not wait for it.
        self.background(self.router.advertise([str(digest)]))
        return fetch

    async def needed(self, ref: Reference, digest: Digest) -> bool:
        """Whether nobody has `digest`: neither this node's containerd nor any peer."""
        held = self.spool.held_locally
        if held is not None and await held(digest):
            return False
        async for _ in self.router.lookup(str(digest), limit=1):
            return False
        return True

    def _withdraw_if_failed(self, fetch: Fetch) -> None:
        if fetch.error is not None:
            self.background(self.router.withdraw([str(fetch.digest)]))

    def background(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
