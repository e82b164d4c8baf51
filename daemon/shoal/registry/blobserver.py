"""One blob as a response: a redirect to the node holding it, a file by sendfile(), or a verified
stream. No response completes until its blob matched its digest (`shoal.content.verify`); on a
mismatch the connection is cut, so containerd never commits the bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import BinaryIO, TypeVar

from aiohttp import web

from shoal import metrics
from shoal.content.model import Blob, Delivery, GrowingFile, LocalFile
from shoal.content.verify import DigestMismatch, verified_chunks
from shoal.oci.digest import Digest
from shoal.oci.errors import BlobUnknown
from shoal.oci.mediatypes import OCTET_STREAM
from shoal.oci.ranges import parse_range
from shoal.registry.protocol import Asker
from shoal.registry.transfer import PeerTransfer

log = logging.getLogger("shoal.registry")

WRITE_SLICE = 128 * 1024
T = TypeVar("T")


class BlobServer:
    def __init__(self, transfer: PeerTransfer) -> None:
        self.transfer = transfer

    async def serve(
        self,
        request: web.Request,
        blob: Blob,
        digest: Digest,
        asker: Asker,
        extra: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """`extra`: more headers (what a peer is told about where the blob comes from)."""
        rng = parse_range(request.headers.get("Range"), blob.size)
        start, end = (rng.start, rng.end + 1) if rng else (0, blob.size)
        headers = {
            "Content-Type": OCTET_STREAM,
            "Docker-Content-Digest": str(digest),
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
            "X-Shoal-Source": blob.source.value,
            **(extra or {}),
        }
        if rng is not None:
            headers["Content-Range"] = rng.content_range(blob.size)
        status = 206 if rng is not None else 200
        if request.method == "HEAD":
            headers["Content-Length"] = str(end - start)
            return web.Response(status=status, headers=headers)
        delivery = blob.delivery()
        if delivery.location is not None and self.transfer.redirects(blob.size, asker):
            # containerd fetches from the peer itself, which verifies what it sends; containerd
            # comes back here with Range if that peer fails midway.
            metrics.count(blob.source, "blob", 307, 0)
            if delivery.redirected is not None:
                delivery.redirected(start)
            return web.Response(status=307, headers={"Location": delivery.location})
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        try:
            await self._send(request, resp, blob, delivery, digest, start, end, asker)
        except DigestMismatch as exc:
            # Bytes already sent cannot be taken back; cutting the connection keeps the
            # response incomplete, so containerd never commits them.
            metrics.VERIFY_FAILURES.labels(blob.source).inc()
            if not resp.prepared:  # nothing sent yet: a miss sends containerd elsewhere
                log.warning("digest mismatch before the first byte: %s", exc)
                raise BlobUnknown("blob unusable here", {"digest": str(digest)}) from None
            log.warning("digest mismatch, connection cut: %s", exc)
            _abort(request)
            return resp
        except Exception as exc:
            if not resp.prepared:
                raise  # nothing sent yet: an error answer lets containerd try its next host
            # Mid-body: containerd resumes with Range, from us or its next host.
            log.warning("%s blob %s broke off: %r", blob.source, digest, exc)
            _abort(request)
            return resp
        to_peer = asker is not Asker.CONTAINERD
        metrics.count(blob.source, "blob", status, end - start, to_peer=to_peer)
        return resp

    async def _send(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        blob: Blob,
        delivery: Delivery,
        digest: Digest,
        start: int,
        end: int,
        asker: Asker,
    ) -> None:
        # containerd gets nothing until the first bytes are here (see _first_then_rest); a
        # peer gets its headers at once: it waits on a relay only as long as its header
        # deadline, and resumes elsewhere from a body that breaks off.
        wait = asker is Asker.CONTAINERD
        local, transport = delivery.local_file, request.transport
        if local is not None and transport is not None:
            await self._send_file(request, resp, local, blob.size, start, end)
            return
        if delivery.growing_file is not None and transport is not None:
            await self._send_growing(request, resp, delivery.growing_file, start, end, wait)
            return
        # Only a blob that verifies as it streams (the spool) is sent as it comes.
        chunks = await _first_then_rest(
            blob.open(start, end)
            if delivery.verified
            else verified_chunks(blob, digest, start, end),
            wait,
        )
        await resp.prepare(request)
        sent = 0
        async for chunk in chunks:
            sent += len(chunk)
            view = memoryview(chunk)
            # Python 3.11's transport buffers what the socket does not take at once and moves
            # the rest down after every send: small writes keep that copying small.
            for pos in range(0, len(view), WRITE_SLICE):
                await resp.write(view[pos : pos + WRITE_SLICE])
        if sent != end - start:
            raise ConnectionError(f"{blob.source} gave {sent} of {end - start} bytes")
        await resp.write_eof()

    async def _send_growing(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        spooled: GrowingFile,
        start: int,
        end: int,
        wait: bool,
    ) -> None:
        """A spooled blob goes out by sendfile() as it lands on disk: the kernel copies, and
        the spool holds back the last piece until the digest matched."""
        try:
            fobj = open(spooled.path, "rb")  # noqa: ASYNC230 - a local file
        except FileNotFoundError:  # retired (containerd has it) or failed since it was found
            raise BlobUnknown("blob left the spool", {"digest": str(spooled.digest)}) from None
        with fobj:
            regions = await _first_then_rest(spooled.regions(start, end), wait)
            await resp.prepare(request)
            await _sendfile(request, fobj, regions, end - start, "spool")
        await resp.write_eof()

    async def _send_file(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        local: LocalFile,
        size: int,
        start: int,
        end: int,
    ) -> None:
        """A file of the node's content store: the kernel copies; `local` says which pieces
        when (all at once for a file on record as verified, else the end once it matched)."""
        try:
            fobj = open(local.path, "rb")  # noqa: ASYNC230 - opening a local file does not block
        except FileNotFoundError:  # deleted since it was found
            raise BlobUnknown("blob left the content store") from None
        with fobj:
            if os.fstat(fobj.fileno()).st_size != size:  # replaced since it was found
                raise BlobUnknown("blob changed in the content store")
            await resp.prepare(request)
            regions = local.regions(fobj.fileno(), start, end)
            await _sendfile(request, fobj, regions, end - start, "local")
        await resp.write_eof()


async def _sendfile(
    request: web.Request,
    fobj: BinaryIO,
    regions: AsyncIterator[tuple[int, int]],
    expected: int,
    what: str,
) -> None:
    loop = asyncio.get_running_loop()
    sent = 0
    async for offset, count in regions:
        assert request.transport is not None
        await loop.sendfile(request.transport, fobj, offset, count)
        sent += count
    if sent != expected:
        raise ConnectionError(f"{what} gave {sent} of {expected} bytes")


async def _first_then_rest(items: AsyncIterator[T], wait: bool = True) -> AsyncIterator[T]:
    """`items` once its first has come. A blob still arriving (the spool, a peer) answers
    nothing until its first bytes are here: when its source fails before that, the request
    gets an error answer, on which containerd tries its next host, instead of a 200 whose body
    breaks off, which fails containerd's pull attempt."""
    if not wait:
        return items
    source = aiter(items)
    try:
        first = await anext(source)
    except StopAsyncIteration:
        return _empty()

    async def rest() -> AsyncIterator[T]:
        yield first
        async for item in source:
            yield item

    return rest()


async def _empty() -> AsyncIterator[T]:
    return
    yield


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
