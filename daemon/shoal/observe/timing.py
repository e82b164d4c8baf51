"""Latency histograms of routing lookups and tag resolution, as wrappers the daemon puts around
the router and the tag policy (the request path itself stays as it is)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from shoal import metrics
from shoal.content.model import Descriptor, Source
from shoal.oci.names import Reference
from shoal.routing.base import Peer
from shoal.sources.chain import TagResolver


class Lookup(Protocol):
    def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]: ...


class TimedLookup:
    """`lookup()` of `router`, observed in `shoal_lookup_duration_seconds` from the call until
    the caller stops reading (every provider it wanted, or the end of the walk)."""

    def __init__(self, router: Lookup) -> None:
        self.router = router

    async def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]:
        started = time.monotonic()
        try:
            async for peer in self.router.lookup(key, limit):
                yield peer
        finally:
            metrics.LOOKUP_DURATION.observe(time.monotonic() - started)


class TimedTags:
    """A tag policy observed in `shoal_resolve_duration_seconds{result="found"|"unknown"}`."""

    def __init__(self, tags: TagResolver) -> None:
        self.tags = tags

    async def resolve(self, ref: Reference, sources: Sequence[Source]) -> Descriptor | None:
        started = time.monotonic()
        found = None
        try:
            found = await self.tags.resolve(ref, sources)
            return found
        finally:
            result = "found" if found is not None else "unknown"
            metrics.RESOLVE_DURATION.labels(result).observe(time.monotonic() - started)
