"""Verification while streaming, in one place: no read or response completes until its blob has
matched its digest.

Every reader of unverified bytes hashes the whole blob (also for a Range: the bytes outside it
are read and hashed, not sent) and holds back its last piece until the digest matched
(`hold_back`). A mismatch raises, and the caller cuts the connection or drops the file, so a
client sees a cut body, never a complete wrong one. The registry, the spool, the upstream
client and the node's own files (`shoal.integrity`) all use these helpers. Whoever finds a
mismatch tells the blob's origin (`reject`): a holder that gave wrong bytes is not asked again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from shoal.content.model import Blob
from shoal.oci.digest import Digest

# Hashing a large chunk on the event loop would stall other requests; hashlib releases the GIL.
THREAD_HASH_MIN = 256 * 1024
# How much of a local file sendfile() leaves for the last, held-back piece.
HOLD_BACK = 64 * 1024

T = TypeVar("T")


class DigestMismatch(Exception):
    def __init__(self, digest: Digest, got: str, size: int, source: str) -> None:
        super().__init__(f"{source} content for {digest} hashed to {got} over {size} bytes")
        self.digest, self.got, self.size, self.source = digest, got, size, source


class Hashing:
    """A running hash of one blob's bytes, checked against its digest at the end."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.count = 0
        self._hasher = digest.hasher()

    def update(self, chunk: bytes) -> None:
        """Hashes here and now (in a worker thread, or for small chunks)."""
        self._hasher.update(chunk)
        self.count += len(chunk)

    async def feed(self, chunk: bytes) -> None:
        """Hashes from the event loop: large chunks in a worker thread."""
        if len(chunk) >= THREAD_HASH_MIN:
            await asyncio.to_thread(self._hasher.update, chunk)
        else:
            self._hasher.update(chunk)
        self.count += len(chunk)

    @property
    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def matches(self, size: int) -> bool:
        return self.count == size and self.digest.matches(self._hasher)

    def check(self, size: int, source: str) -> None:
        """Raises DigestMismatch unless exactly `size` bytes were hashed and they matched."""
        if not self.matches(size):
            raise DigestMismatch(self.digest, self.hexdigest, self.count, source)


async def hold_back(
    items: AsyncIterator[T],
    check: Callable[[], Awaitable[None]],
    final: Callable[[T], bool] | None = None,
) -> AsyncIterator[T]:
    """`items`, the last one only after `check()` returned (it raises when the blob is bad).

    Without `final`, each item waits for the next (only the end of `items` tells which is the
    last). With `final`, items pass at once and only the one `final` recognises is held. `check`
    is awaited once, also when `items` yields nothing.
    """
    checked = False
    held: list[T] = []  # at most one
    async for item in items:
        if final is None:
            if held:
                yield held.pop()
            held.append(item)
        elif final(item):
            await check()
            checked = True
            yield item
        else:
            yield item
    if not checked:
        await check()
    if held:
        yield held.pop()


async def verified_chunks(blob: Blob, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
    """Yields bytes [start, end) of `blob`; the last chunk only once the whole blob matched."""
    hashing = Hashing(digest)

    async def wanted() -> AsyncIterator[bytes]:
        pos = 0
        async for chunk in blob.open(0, blob.size):
            await hashing.feed(chunk)
            lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
            pos += len(chunk)
            if lo < hi:
                yield chunk if (lo == 0 and hi == len(chunk)) else chunk[lo:hi]

    async def check() -> None:
        if not hashing.matches(blob.size):
            reject(blob)
        hashing.check(blob.size, blob.source)

    async for piece in hold_back(wanted(), check):
        yield piece


def reject(blob: Blob) -> None:
    """Tells `blob`'s origin that its bytes did not match (`Delivery.on_mismatch`)."""
    on_mismatch = blob.delivery().on_mismatch
    if on_mismatch is not None:
        on_mismatch()
