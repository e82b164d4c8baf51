"""Content held in memory: a manifest, small and read whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

from shoal.content.model import STREAMED, Delivery, SourceKind


class MemoryBlob:
    """Bytes in memory. Not `verified`: the registry hashes it per response anyway (small)."""

    def __init__(self, data: bytes, source: SourceKind = SourceKind.UPSTREAM) -> None:
        self.data = data
        self.size = len(data)
        self.source = source

    def delivery(self) -> Delivery:
        return STREAMED

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        if start < end:
            yield self.data[start:end]
