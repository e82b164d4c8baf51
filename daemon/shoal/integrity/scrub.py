"""The scrub: every file on record as verified is hashed again in the background, at least once
per `interval` (a day by default), so bytes that rot on the disk without changing the file's
identity are found before they are served for long.

Bounded: it reads at `clamp(recorded bytes / interval, min_rate, max_rate)` bytes per second
(at `min_rate` while local files are being served), in one worker thread of its own at the
lowest CPU priority, dropping the file's cached pages before and after so that it reads what is
on the disk and leaves the page cache to the serving path. A file that no longer matches is
quarantined (`guard`); one that vanished is forgotten; one whose identity changed is hashed
now. Quarantined digests are looked at too: a new file that matches lifts the quarantine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shoal import metrics
from shoal.content.verify import Hashing
from shoal.integrity.guard import Integrity
from shoal.integrity.identity import FileIdentity
from shoal.integrity.ledger import Verified
from shoal.oci.digest import Digest
from shoal.oci.errors import RegistryError

log = logging.getLogger("shoal.integrity")

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ScrubSettings:
    interval: float = 86400.0  # seconds: every recorded file is hashed again this often
    min_rate: float = 4 * 1024 * 1024  # bytes/s, also while serving is busy
    max_rate: float = 64 * 1024 * 1024  # bytes/s
    idle: float = 60.0  # seconds between looks when nothing is due


class Scrub:
    def __init__(
        self,
        integrity: Integrity,
        path_of: Callable[[Digest], str | None],
        settings: ScrubSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`path_of`: where the node's content store keeps a digest's file (None: nowhere)."""
        self.integrity = integrity
        self.ledger = integrity.ledger
        self.path_of = path_of
        self.settings = settings or ScrubSettings()
        self.clock = clock
        self._pool: ThreadPoolExecutor | None = None

    def rate(self) -> float:
        s = self.settings
        if self.integrity.active > 0:
            return s.min_rate
        return min(s.max_rate, max(s.min_rate, self.ledger.verified_bytes() / s.interval))

    def due(self) -> tuple[Verified | None, float]:
        """The entry checked longest ago, and how many seconds until it is due (≤ 0: now)."""
        entries = self.ledger.verified()
        if not entries:
            return None, self.settings.idle
        oldest = min(entries, key=lambda e: e.at)
        return oldest, oldest.at + self.settings.interval - self.clock()

    async def run(self) -> None:
        """Runs until cancelled."""
        self._pool = ThreadPoolExecutor(1, "shoal-scrub", initializer=_lowest_priority)
        looked = float("-inf")
        try:
            while True:
                if time.monotonic() - looked >= self.settings.idle:
                    looked = time.monotonic()
                    await self.look_at_quarantined()
                entry, wait = self.due()
                if entry is None or wait > 0:
                    await asyncio.sleep(min(max(wait, 0.0), self.settings.idle))
                    continue
                await self.scrub(entry)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def look_at_quarantined(self) -> None:
        for key in self.ledger.quarantined():
            path = self._path(key)
            if path is not None:
                await self.integrity.recheck(Digest.parse(key), path)

    async def scrub(self, entry: Verified) -> None:
        """Hashes the file of `entry` again: recorded anew, quarantined, or forgotten."""
        path = self._path(entry.digest)
        try:
            if path is None:
                raise FileNotFoundError(entry.digest)
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.ledger.forget(entry.digest)  # gone (or unreadable): nothing is served from it
            return
        digest = Digest.parse(entry.digest)
        try:
            identity = FileIdentity.of(os.fstat(fd))
            if identity.size != entry.identity.size:
                self.integrity.mismatch(digest, identity, "scrub")
                return
            ok = await self._hash(fd, digest, identity.size)
            if FileIdentity.of(os.fstat(fd)) != identity:
                return  # changed while it was read: the next pass looks at the new file
        finally:
            os.close(fd)
        if self.ledger.verified_entry(entry.digest) != entry:
            return  # quarantined or recorded anew meanwhile, by the serving path
        if ok:
            self.ledger.record(identity, entry.digest)
        else:
            self.integrity.mismatch(digest, identity, "scrub")

    async def _hash(self, fd: int, digest: Digest, size: int) -> bool:
        loop = asyncio.get_running_loop()
        hashing = Hashing(digest)
        _drop_cache(fd)
        try:
            while True:
                started = time.monotonic()
                n = await loop.run_in_executor(self._pool, _hash_chunk, fd, hashing)
                if n == 0:
                    return hashing.matches(size)
                metrics.SCRUBBED_BYTES.inc(n)
                await asyncio.sleep(max(0.0, n / self.rate() - (time.monotonic() - started)))
        finally:
            _drop_cache(fd)

    def _path(self, digest: str) -> str | None:
        try:
            return self.path_of(Digest.parse(digest))
        except RegistryError:
            return None


def _hash_chunk(fd: int, hashing: Hashing) -> int:
    data = os.pread(fd, CHUNK, hashing.count)
    hashing.update(data)
    return len(data)


def _drop_cache(fd: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _lowest_priority() -> None:
    """The scrub's thread runs at nice 19 (Linux sets it per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
