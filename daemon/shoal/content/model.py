"""Descriptors, Blobs and Sources: the vocabulary every part of shoal's request path shares.

A Source answers with what it believes; the registry verifies every byte against the digest
before a response completes (`shoal.content.verify`): a Source is never trusted. How a Blob may
be sent beyond streaming `open()` is stated by its `delivery()`, so the blob server chooses by
capability, never by a Blob's type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal, Protocol

from shoal.oci.digest import Digest
from shoal.oci.names import Reference

# Read buffer of the HTTP sources (peers, upstream). aiohttp pauses reading once twice this much
# is buffered; its 64 KiB default costs a pause and a resume (epoll changes and a wake-up) for
# every 128 KiB of a fast body.
READ_BUFSIZE = 1024 * 1024

# Registries serve manifests and blobs under different paths.
ContentKind = Literal["manifest", "blob"]


class SourceKind(StrEnum):
    """Where content comes from. The values are the `source` label of shoal's metrics and the
    `X-Shoal-Source` header."""

    LOCAL = "local"  # this node's containerd
    INFLIGHT = "inflight"  # this node's spool, while a fetch runs (its blobs name their origin)
    PEER = "peer"  # another node's shoal
    UPSTREAM = "upstream"  # the registry named by `ns`


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int


class GrowingFile(Protocol):
    """A local file still being written, whose writer verifies it (the spool's Fetch)."""

    @property
    def path(self) -> Path: ...

    @property
    def digest(self) -> Digest: ...

    def regions(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) pieces of [start, end) as they land; the last piece only once the
        whole blob matched its digest."""
        ...


class LocalFile(Protocol):
    """A whole, immutable file of the node's content store, sent by sendfile()."""

    @property
    def path(self) -> str: ...

    def regions(self, fd: int, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) pieces of [start, end) of the open file `fd`, the last one only
        once the file is known to match its digest; raises DigestMismatch when it does not."""
        ...


@dataclass(frozen=True)
class Delivery:
    """How a Blob may be sent besides streaming `open()` through the verifier.

    `verified`: `open()` itself holds back the end of every read until the whole blob matched
    its digest (the spool), so the registry need not hash it again. `local_file`: a file of the
    node's content store, sent by sendfile() (`shoal.integrity` decides whether it is hashed).
    `growing_file`: a verified file readable by regions as it lands. `location`: another node
    serves these bytes (and verifies what it sends); whether the client is sent there is the
    registry's choice, and `redirected(start)` is told when it is. `on_mismatch`: called by
    whoever finds the blob's bytes do not match its digest, so their origin can learn it.
    """

    verified: bool = False
    local_file: LocalFile | None = None
    growing_file: GrowingFile | None = None
    location: str | None = None
    redirected: Callable[[int], None] | None = None
    on_mismatch: Callable[[], None] | None = None


STREAMED = Delivery()  # only `open()`, every byte hashed by the registry


class Blob(Protocol):
    """Content a Source can stream."""

    @property
    def size(self) -> int: ...

    @property
    def source(self) -> SourceKind:
        """Where the bytes come from (for metrics, logs and `X-Shoal-Source`)."""
        ...

    def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield bytes [start, end) in order; may raise OSError/ConnectionError midway."""
        ...

    def delivery(self) -> Delivery: ...


class Source(Protocol):
    @property
    def name(self) -> SourceKind: ...

    async def resolve(self, ref: Reference) -> Descriptor | None:
        """What `ref`'s tag points at, or None if this source does not know."""
        ...

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        """The content with `digest`, or None if this source does not have it."""
        ...
