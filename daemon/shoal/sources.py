"""Where content can come from: the node's store, a peer, the upstream registry.

The registry asks Sources in order. A Source answers with what it believes, and the registry
verifies every byte against the digest before a response completes: a Source is never trusted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from shoal.oci.digest import Digest
from shoal.oci.names import Reference

# Read buffer of the HTTP sources (peers, upstream). aiohttp pauses reading once twice this much
# is buffered; its 64 KiB default costs a pause and a resume (epoll changes and a wake-up) for
# every 128 KiB of a fast body.
READ_BUFSIZE = 1024 * 1024


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int


class Blob(Protocol):
    """Content a Source can stream. `path` is set when it is a whole, immutable local file.

    `verified` is True only for shoal's own upstream spool, which hashes what it writes and
    holds back the end of every read until the digest matched; everything else is re-hashed.
    """

    @property
    def size(self) -> int: ...

    @property
    def source(self) -> str: ...

    @property
    def verified(self) -> bool: ...

    def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield bytes [start, end) in order; may raise OSError/ConnectionError midway."""
        ...

    @property
    def path(self) -> str | None: ...


@runtime_checkable
class Relocatable(Protocol):
    """A Blob that another node serves: the client may be sent there to fetch it itself."""

    def location(self) -> str | None:
        """A URL serving these bytes (verified by the node there), or None to relay them here."""
        ...


class Source(Protocol):
    name: str

    async def resolve(self, ref: Reference) -> Descriptor | None:
        """What `ref`'s tag points at, or None if this source does not know."""
        ...

    async def find(self, ref: Reference, digest: Digest, kind: str) -> Blob | None:
        """The content with `digest`, or None if this source does not have it.

        `kind` is "manifest" or "blob": registries serve the two under different paths.
        """
        ...
