"""How one of the node's own blob files is sent: by sendfile() alone when its identity is on
record as verified, else hashed in full while the kernel sends all but its end, which goes out
only once the whole file matched (`shoal.content.verify`'s rule, for files)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from shoal.content.model import SourceKind
from shoal.content.verify import HOLD_BACK, DigestMismatch, Hashing
from shoal.integrity.identity import FileIdentity
from shoal.oci.digest import Digest

READ_CHUNK = 1024 * 1024


class Judge(Protocol):
    """What a file being sent needs of the guard (`shoal.integrity.guard.Integrity`)."""

    def is_verified(self, identity: FileIdentity, digest: Digest) -> bool: ...

    async def check(self, fd: int, identity: FileIdentity, digest: Digest) -> bool:
        """Whether the whole file matches `digest` (recorded when it does, quarantined when
        it does not)."""
        ...

    def sending(self, delta: int) -> None: ...


class CheckedFile:
    """A blob in the node's content store, as the blob server sends it (`Delivery.local_file`)."""

    def __init__(self, path: str, digest: Digest, size: int, judge: Judge) -> None:
        self.path = path
        self.digest = digest
        self.size = size
        self.judge = judge

    async def regions(self, fd: int, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) pieces of [start, end) of the open file `fd` to send; the last one
        only once the file is known to match (at once when verified before). Raises
        DigestMismatch when it does not."""
        identity = FileIdentity.of(os.fstat(fd))
        self.judge.sending(1)
        try:
            if identity.size == self.size and self.judge.is_verified(identity, self.digest):
                if start < end:
                    yield start, end - start
                return
            checked = asyncio.ensure_future(self.judge.check(fd, identity, self.digest))
            try:
                tail = max(start, end - HOLD_BACK)
                if tail > start:
                    yield start, tail - start
                if not await checked:
                    raise DigestMismatch(self.digest, "differs", self.size, SourceKind.LOCAL)
                if end > tail:
                    yield tail, end - tail
            finally:
                if not checked.done():
                    checked.cancel()
        finally:
            self.judge.sending(-1)


class SharedHashes:
    """Hashes whole files, one pass per file identity shared by every request that needs it
    at the same time (each started from its own duplicate of the file descriptor)."""

    def __init__(self) -> None:
        self._running: dict[tuple[FileIdentity, Digest], asyncio.Future[bool]] = {}

    async def matches(
        self,
        fd: int,
        identity: FileIdentity,
        digest: Digest,
        hash_fd: Callable[[int, Digest, int], bool] | None = None,
    ) -> bool:
        key = (identity, digest)
        pending = self._running.get(key)
        if pending is None:
            # A private duplicate: the shared pass must not depend on the first request's fd.
            dup = os.dup(fd)
            pending = asyncio.ensure_future(
                asyncio.to_thread(hash_fd or hash_whole, dup, digest, identity.size)
            )
            self._running[key] = pending
            pending.add_done_callback(lambda _: self._running.pop(key, None))
        # Shielded: one cancelled request must not cancel the pass others are waiting on.
        return await asyncio.shield(pending)


def hash_whole(fd: int, digest: Digest, size: int) -> bool:
    """Whether the whole file behind `fd` is `size` bytes matching `digest`; closes `fd`."""
    hashing = Hashing(digest)
    try:
        while chunk := os.pread(fd, READ_CHUNK, hashing.count):
            hashing.update(chunk)
    finally:
        os.close(fd)
    return hashing.matches(size)
