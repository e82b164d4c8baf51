"""Streaming with verification: no response completes until its blob's digest has matched.

The whole blob is always hashed, also for a Range request (the bytes outside the range are read
and hashed but not sent), and the last chunk of the response is held back until the digest
matches. A mismatch raises DigestMismatch, and the caller aborts the connection so the client
sees a cut body, never a complete wrong one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from shoal.oci.digest import Digest
from shoal.sources import Blob

# Hashing a large chunk on the event loop would stall other requests; hashlib releases the GIL.
_THREAD_HASH_MIN = 256 * 1024
# How much of a file sendfile() leaves for the last, held-back write.
HOLD_BACK = 64 * 1024


class DigestMismatch(Exception):
    def __init__(self, digest: Digest, got: str, size: int, source: str) -> None:
        super().__init__(f"{source} content for {digest} hashed to {got} over {size} bytes")
        self.digest, self.got, self.size, self.source = digest, got, size, source


async def _update(hasher: object, chunk: bytes) -> None:
    if len(chunk) >= _THREAD_HASH_MIN:
        await asyncio.to_thread(hasher.update, chunk)  # type: ignore[attr-defined]
    else:
        hasher.update(chunk)  # type: ignore[attr-defined]


async def verified_chunks(blob: Blob, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
    """Yields bytes [start, end) of `blob`; the last chunk only once the whole blob matched."""
    hasher = digest.hasher()
    pos = 0
    held: bytes | None = None
    async for chunk in blob.open(0, blob.size):
        await _update(hasher, chunk)
        lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
        pos += len(chunk)
        if lo >= hi:
            continue
        piece = chunk if (lo == 0 and hi == len(chunk)) else chunk[lo:hi]
        if held is not None:
            yield held
        held = piece
    if pos != blob.size or not digest.matches(hasher):
        raise DigestMismatch(digest, hasher.hexdigest(), pos, blob.source)
    if held is not None:
        yield held


class FileVerifier:
    """Hashes local files, sharing one pass among concurrent requests for the same file.

    Keyed by inode and change time, so a joined pass covers exactly the bytes every joined
    request sends. Results are not kept after the pass: each new request verifies anew.
    """

    def __init__(self) -> None:
        self._running: dict[tuple[int, int, int, int], asyncio.Future[bool]] = {}

    async def check(self, fd: int, digest: Digest, size: int) -> bool:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_ctime_ns, size)
        pending = self._running.get(key)
        if pending is None:
            # A private duplicate: the shared pass must not depend on the first request's fd.
            dup = os.dup(fd)
            pending = asyncio.ensure_future(asyncio.to_thread(_hash_fd, dup, digest, size))
            self._running[key] = pending
            pending.add_done_callback(lambda _: self._running.pop(key, None))
        # Shielded: one cancelled request must not cancel the pass others are waiting on.
        return await asyncio.shield(pending)


def _hash_fd(fd: int, digest: Digest, size: int) -> bool:
    """Hashes the whole file behind `fd`, then closes it."""
    hasher = digest.hasher()
    total = 0
    try:
        while chunk := os.pread(fd, 1024 * 1024, total):
            hasher.update(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    return total == size and digest.matches(hasher)
