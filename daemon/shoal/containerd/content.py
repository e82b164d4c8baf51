"""Reading containerd's Content service: committed blobs' info, listings and bytes.

Blob bytes are read straight from containerd's content directory when this process can read it
(much faster than gRPC Read, which streams small chunks), else through gRPC.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence

import grpc

from shoal.containerd.api import content_pb2
from shoal.containerd.connection import Connection, parse_digest
from shoal.containerd.model import ContainerdError, ContainerdNotFound, ContentInfo, rpc_error
from shoal.oci.digest import Digest
from shoal.oci.mediatypes import MAX_MANIFEST_BYTES

DISK_CHUNK = 256 * 1024


class ContentReads(Connection):
    async def info(self, digest: str | Digest) -> ContentInfo | None:
        """The committed blob's info, or None if the store does not have it."""
        d = str(parse_digest(digest))
        try:
            resp = await self._unary(
                f"info {d}", self._api.content.Info, content_pb2.InfoRequest(digest=d)
            )
        except ContainerdNotFound:
            return None
        return ContentInfo.from_proto(resp.info)

    async def list_content(self, filters: Sequence[str] = ()) -> list[ContentInfo]:
        """Every committed blob (optionally filtered, e.g. `labels."containerd.io/…"`)."""
        call = self._api.content.List(
            content_pb2.ListContentRequest(filters=list(filters)), metadata=self._metadata
        )
        out: list[ContentInfo] = []
        try:
            async for resp in call:
                out.extend(ContentInfo.from_proto(info) for info in resp.info)
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, "list content") from err
        return out

    async def read(
        self, digest: str | Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) of a committed blob through gRPC Read.

        Raises ContainerdNotFound if the blob is not committed, ContainerdError (OUT_OF_RANGE)
        when offset is past its end.
        """
        if length is not None and length <= 0:
            return
        d = str(parse_digest(digest))
        call = self._api.content.Read(
            content_pb2.ReadContentRequest(digest=d, offset=offset, size=length or 0),
            metadata=self._metadata,
        )
        received = 0
        try:
            async for resp in call:
                # containerd counts from the requested offset; accept absolute offsets too,
                # in case a later version changes that.
                if resp.offset not in (received, offset + received):
                    raise ContainerdError(
                        f"containerd read {d}: chunk at {resp.offset}, expected {received}"
                    )
                received += len(resp.data)
                if resp.data:
                    yield resp.data
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, f"read {d}") from err
        finally:
            call.cancel()

    async def open_blob(
        self, digest: str | Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) of a committed blob, from disk when possible.

        Reads the file in DISK_CHUNK pieces off the event loop; falls back to gRPC Read when the
        content directory is unknown or unreadable, or the file is not there.
        """
        if length is not None and length <= 0:
            return
        d = parse_digest(digest)
        path = self.blob_path(d)
        fd = -1
        if path is not None:
            try:
                fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1
        if fd < 0:
            async for chunk in self.read(d, offset, length):
                yield chunk
            return
        try:
            size = os.fstat(fd).st_size
            if offset > size:
                raise ContainerdError(
                    f"read {d}: offset {offset} past its end ({size} bytes)",
                    grpc.StatusCode.OUT_OF_RANGE,
                )
            end = size if length is None else min(size, offset + length)
            pos = offset
            while pos < end:
                data = await asyncio.to_thread(os.pread, fd, min(DISK_CHUNK, end - pos), pos)
                if not data:
                    raise ContainerdError(f"read {d}: file ended at {pos} of {end} bytes")
                pos += len(data)
                yield data
        finally:
            os.close(fd)

    async def read_blob(self, digest: str | Digest, max_size: int = MAX_MANIFEST_BYTES) -> bytes:
        """A whole (small) blob in memory, e.g. a manifest; ValueError if over `max_size`."""
        chunks: list[bytes] = []
        total = 0
        async for chunk in self.open_blob(digest, 0, max_size + 1):
            total += len(chunk)
            if total > max_size:
                raise ValueError(f"blob {digest} is larger than {max_size} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
