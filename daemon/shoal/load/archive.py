"""What `shoal load` reads: an OCI layout directory, or a tar (an OCI archive, or a docker-archive
from `docker save`; plain or compressed; `-` for standard input), member by member.

Tar members are read strictly in order, each in chunks, so nothing is ever held whole in memory
and a pipe works as well as a file. Nothing is extracted to disk: paths only name what a member
is, so `..` or absolute paths cannot escape anywhere (they are skipped).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import sys
import tarfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

CHUNK = 1024 * 1024


class ArchiveError(Exception):
    """The input cannot be read as an image archive (truncated, not a tar, unreadable)."""


@dataclass
class Entry:
    """One file of the layout: `path` relative to its root, POSIX style. `link` is set for a
    tar link member (docker-archives link duplicate layers): the path it stands for."""

    path: str
    size: int
    stream: IO[bytes] | None
    link: str | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.stream is None:
            return
        left = self.size
        while left > 0:
            try:
                data = await asyncio.to_thread(self.stream.read, min(CHUNK, left))
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                what = f"the archive is damaged or truncated in {self.path}: {exc}"
                raise ArchiveError(what) from None
            if not data:
                got = self.size - left
                raise ArchiveError(f"{self.path} ends after {got} of {self.size} bytes")
            left -= len(data)
            yield data

    async def read_small(self, limit: int) -> bytes:
        if self.size > limit:
            raise ArchiveError(f"{self.path} is {self.size} bytes, more than {limit}")
        return b"".join([c async for c in self.chunks()])


def _clean(name: str) -> str | None:
    """A member's path inside the layout, or None for one pointing outside it."""
    if name.startswith("/"):
        return None
    path = posixpath.normpath(name)
    return None if path in (".", "..") or path.startswith("../") else path


class Source:
    """An archive being read: `entries()` once, `progress()` at any time (bytes read, total;
    total is 0 when unknown, as for a pipe)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._file: BinaryIO | None = None
        self.total = 0
        self.done = 0  # directories: bytes of the files already read

    def progress(self) -> tuple[int, int]:
        if self._file is None:
            return self.done, self.total
        try:
            return self._file.tell(), self.total
        except (OSError, ValueError):
            return 0, self.total

    async def entries(self) -> AsyncIterator[Entry]:
        if self.where != "-" and await asyncio.to_thread(os.path.isdir, self.where):
            async for entry in self._directory(Path(self.where)):
                yield entry
            return
        async for entry in self._tar():
            yield entry

    async def _directory(self, root: Path) -> AsyncIterator[Entry]:
        files = await asyncio.to_thread(_files, root)
        self.total = sum(size for _, size in files)
        for path, size in files:
            with open(path, "rb") as stream:  # noqa: ASYNC230 - a local file, read in a thread
                yield Entry(path.relative_to(root).as_posix(), size, stream)
            self.done += size

    async def _tar(self) -> AsyncIterator[Entry]:
        if self.where == "-":
            raw: BinaryIO = sys.stdin.buffer
        else:
            try:
                raw = open(self.where, "rb")  # noqa: ASYNC230 - closed below
            except OSError as exc:
                raise ArchiveError(f"cannot read {self.where}: {exc.strerror}") from None
            self.total = os.fstat(raw.fileno()).st_size
        self._file = raw
        try:
            try:
                tar = await asyncio.to_thread(tarfile.open, fileobj=raw, mode="r|*")
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise ArchiveError(f"{self.where} is not a tar archive: {exc}") from None
            with tar:
                while True:
                    try:
                        member = await asyncio.to_thread(tar.next)
                    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
                        raise ArchiveError(f"{self.where} is damaged or truncated: {exc}") from None
                    if member is None:
                        return
                    path = _clean(member.name)
                    if path is None:
                        continue
                    if member.issym() or member.islnk():
                        base = posixpath.dirname(path) if member.issym() else ""
                        target = _clean(posixpath.join(base, member.linkname))
                        if target is not None:
                            yield Entry(path, 0, None, link=target)
                        continue
                    if not member.isfile():
                        continue
                    yield Entry(path, member.size, tar.extractfile(member))
        finally:
            if raw is not sys.stdin.buffer:
                raw.close()


def _files(root: Path) -> list[tuple[Path, int]]:
    return sorted((p, p.stat().st_size) for p in root.rglob("*") if p.is_file())
