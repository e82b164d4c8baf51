"""The spool: blobs from upstream and from peers written to local files, readable while they
arrive (README, "Upstream, once per cluster", 1 and 2).

One Fetch per digest (single flight on this node): the first request starts it, later ones and
peers join it and read the same growing file. A Fetch runs on its own, independent of the
request that started it, so a client that gives up does not waste what others wait for.

A Fetch hashes everything it writes and fails on a mismatch (the file is removed, and the source
is told, so a peer that sent bad bytes is not asked again), holding back the end of every read
until then (`shoal.content.verify`). The spool directory is emptied at start: nothing partial
or unverified survives a restart. Finished files stay until the node's containerd holds the
blob (or `keep_for` passes), so peers can still fetch them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from shoal.content.model import Blob, Delivery, SourceKind
from shoal.content.verify import Hashing, hold_back, reject
from shoal.oci.digest import Digest

log = logging.getLogger("shoal.spool")

READ_CHUNK = 1024 * 1024
# Bytes trickle in from a slow upstream a few KiB at a time. Passing each trickle on costs every
# hop per piece (a thread hop here, a sendfile per reader, a read and a gRPC write in containerd),
# so the file grows in batches of up to WRITE_BATCH, each held back at most LINGER seconds.
WRITE_BATCH = 1024 * 1024
LINGER = 0.05


# A node that crashed strands its whole subtree at once: the next fetcher in line may itself be
# between sources when asked, so a rescue may need a few tries while the tree re-forms. Each
# failed try that gives up sends containerd to the registry for the whole blob.
MAX_RESCUES = 5
RESCUE_PAUSE = 1.0  # before every try after the first

# What a fetch that lost its source may continue from: a Blob readable from `pos` (or None).
Rescue = Callable[[int], Awaitable[Blob | None]]


class FetchFailed(ConnectionError):
    pass


class Fetch:
    def __init__(
        self, digest: Digest, size: int, path: Path, origin: SourceKind = SourceKind.UPSTREAM
    ) -> None:
        self.digest = digest
        self.size = size
        self.path = path
        self.origin = origin  # where the bytes come from, for metrics
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._progress = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None
        # Created here, not in run(): a reader that joins before run() got going must find the
        # file (it opens it to sendfile() from). Creating an empty local file does not block.
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )

    async def run(self, source: Blob, rescue: Rescue | None = None) -> None:
        """Copies `source` into the file, hashing as it goes; wakes readers after each chunk.
        A source that fails midway is replaced by what `rescue` offers for the rest (up to
        MAX_RESCUES times): the readers waiting on this file, containerd among them, never
        see the loss. The hash spans every source, so a bad prefix still fails the whole."""
        hashing = Hashing(self.digest)
        started: float | None = None
        fd = self._fd
        assert fd is not None, "a Fetch runs once"
        rescues = 0
        try:
            while True:
                try:
                    async for batch in _batched(source.open(self.written, self.size)):
                        started = started or time.monotonic()  # a queued source waits first
                        # One worker-thread hop writes and hashes: the event loop stays free.
                        await asyncio.to_thread(_write_all, fd, batch, self.written, hashing)
                        async with self._progress:
                            self.written += len(batch)
                            self._progress.notify_all()
                    break
                except (ConnectionError, TimeoutError) as exc:
                    if rescue is None or rescues >= MAX_RESCUES or self.written >= self.size:
                        raise
                    if rescues:
                        await asyncio.sleep(RESCUE_PAUSE)
                    rescues += 1
                    replacement = await rescue(self.written)
                    if replacement is None:
                        raise
                    log.info("fetch of %s lost its source at byte %d (%s); continuing from %s",
                             self.digest, self.written, exc, replacement.source)  # fmt: skip
                    source = replacement
            if self.written != self.size or not hashing.matches(self.size):
                reject(source)  # its origin learns it (a peer is not asked again)
                raise FetchFailed(f"{self.digest}: {source.source} bytes did not match the digest")
            took = time.monotonic() - (started or time.monotonic())
            log.info(
                "fetched %s from %s: %d bytes in %.2fs (%.1f MB/s)",
                self.digest, self.origin, self.size, took, self.size / max(took, 1e-6) / 1e6,
            )  # fmt: skip
        except BaseException as exc:
            self.error = exc if isinstance(exc, Exception) else FetchFailed("cancelled")
            with contextlib.suppress(OSError):
                self.path.unlink()
            log.warning("fetch of %s failed at byte %d: %r", self.digest, self.written, exc)
            raise
        finally:
            self.close_file()
            async with self._progress:
                self.done = True
                self.finished_at = time.monotonic()
                self._progress.notify_all()

    def close_file(self) -> None:
        """Closes the writing end (also for a fetch cancelled before it ever ran)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def complete(self) -> bool:
        return self.done and self.error is None

    async def _available_past(self, pos: int) -> int:
        """Waits until the file holds bytes past `pos`; returns how many it holds."""
        async with self._progress:
            while self.written <= pos and not self.done:
                await self._progress.wait()
            available, error = self.written, self.error
        if error is not None:
            raise FetchFailed(f"fetch of {self.digest} failed: {error!r}")
        if available <= pos:
            raise FetchFailed(f"{self.digest} ended at {available} of {self.size}")
        return available

    async def over(self) -> None:
        """Waits until the fetch is over, whether it succeeded or not."""
        async with self._progress:
            while not self.done:
                await self._progress.wait()

    async def _verified(self) -> None:
        """Waits until the fetch is over; raises unless the whole blob matched its digest."""
        await self.over()
        if self.error is not None:
            raise FetchFailed(f"fetch of {self.digest} failed: {self.error!r}")

    def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) as they arrive. The last chunk is held back until the whole blob
        has matched its digest, so no read of a bad fetch ever completes."""
        return hold_back(self._follow(start, end), self._verified)

    def regions(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) pieces of [start, end) as they land in the file, for sendfile();
        like read(), the last piece only once the whole blob matched its digest."""
        return hold_back(self._landed(start, end), self._verified, lambda r: r[0] + r[1] == end)

    async def _landed(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        pos = start
        while pos < end:
            stop = min(end, await self._available_past(pos))
            yield pos, stop - pos
            pos = stop

    async def _follow(self, start: int, end: int) -> AsyncIterator[bytes]:
        pos = start
        fd = -1
        try:
            while pos < end:
                want = min(end, await self._available_past(pos)) - pos
                if fd < 0:
                    fd = await asyncio.to_thread(os.open, self.path, os.O_RDONLY | os.O_CLOEXEC)
                while want > 0:
                    data = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, want), pos)
                    if not data:
                        raise FetchFailed(f"{self.path} shorter than written")
                    pos += len(data)
                    want -= len(data)
                    yield data
        finally:
            if fd >= 0:
                os.close(fd)


async def _batched(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Joins chunks up to WRITE_BATCH bytes; what arrived is passed on at most LINGER seconds
    after its first byte, also while the source stalls."""
    source = aiter(chunks)
    parts: list[bytes] = []
    size, flush_at = 0, 0.0
    next_chunk: asyncio.Future[bytes] | None = None
    loop = asyncio.get_running_loop()
    try:
        while True:
            if next_chunk is None:
                next_chunk = asyncio.ensure_future(anext(source))
            wait = max(0.0, flush_at - loop.time()) if parts else None
            done, _ = await asyncio.wait({next_chunk}, timeout=wait)
            if done:
                try:
                    chunk = next_chunk.result()
                except StopAsyncIteration:
                    break
                finally:
                    next_chunk = None
                if not parts:
                    flush_at = loop.time() + LINGER
                parts.append(chunk)
                size += len(chunk)
            if parts and (size >= WRITE_BATCH or loop.time() >= flush_at):
                yield parts[0] if len(parts) == 1 else b"".join(parts)
                parts, size = [], 0
        if parts:
            yield b"".join(parts)
    finally:
        if next_chunk is not None:
            next_chunk.cancel()
            with contextlib.suppress(BaseException):
                await next_chunk


def _write_all(fd: int, data: bytes, offset: int, hashing: Hashing) -> None:
    hashing.update(data)
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


@dataclass
class SpoolBlob:
    """A Blob read from a Fetch; `source` says where its bytes came from originally.

    Verified: the Fetch hashed these very bytes as it wrote them and holds back every read's
    last piece until they matched, so the registry need not hash them again per response. The
    file may still grow: it is sent by regions as they land, never as a whole file.
    """

    fetch: Fetch
    source: SourceKind

    @property
    def size(self) -> int:
        return self.fetch.size

    def delivery(self) -> Delivery:
        return Delivery(verified=True, growing_file=self.fetch)

    def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        return self.fetch.read(start, end)


class Spool:
    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        *,
        keep_for: float = 600.0,
        held_locally: Callable[[Digest], Awaitable[bool]] | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.keep_for = keep_for
        self.held_locally = held_locally
        self.fetches: dict[Digest, Fetch] = {}
        # Left over from an earlier run: unverified by definition.
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def used(self) -> int:
        return sum(f.size for f in self.fetches.values())

    def get(self, digest: Digest) -> Fetch | None:
        fetch = self.fetches.get(digest)
        if fetch is None or fetch.error is not None:
            return None
        return fetch

    def start(self, digest: Digest, source: Blob, rescue: Rescue | None = None) -> Fetch | None:
        """Joins the running Fetch of `digest`, or starts one; None when the spool is full."""
        existing = self.get(digest)
        if existing is not None:
            return existing
        self._evict()
        if self.used + source.size > self.max_bytes:
            return None
        path = self.dir / f"{digest.algorithm}-{digest.hex}"
        fetch = Fetch(digest, source.size, path, source.source)
        self.fetches[digest] = fetch
        fetch.task = asyncio.create_task(self._run(fetch, source, rescue), name=f"fetch {digest}")
        return fetch

    async def _run(self, fetch: Fetch, source: Blob, rescue: Rescue | None) -> None:
        try:
            await fetch.run(source, rescue)
        except Exception:
            self.fetches.pop(fetch.digest, None)
            return
        await self._retire(fetch)

    async def _retire(self, fetch: Fetch) -> None:
        """Keeps a finished file until containerd has the blob, then frees the space."""
        deadline = time.monotonic() + self.keep_for
        while time.monotonic() < deadline:
            if self.held_locally is not None and await self.held_locally(fetch.digest):
                break
            await asyncio.sleep(2.0)
        self._drop(fetch)

    def _drop(self, fetch: Fetch) -> None:
        if self.fetches.get(fetch.digest) is fetch:
            del self.fetches[fetch.digest]
        with contextlib.suppress(OSError):
            fetch.path.unlink()

    def _evict(self) -> None:
        """Under pressure, finished files go first, oldest first (they can be fetched again)."""
        finished = sorted(
            (f for f in self.fetches.values() if f.complete), key=lambda f: f.finished_at or 0
        )
        while finished and self.used > self.max_bytes * 0.8:
            self._drop(finished.pop(0))

    async def close(self) -> None:
        tasks = [f.task for f in self.fetches.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for fetch in self.fetches.values():
            fetch.close_file()
        shutil.rmtree(self.dir, ignore_errors=True)
