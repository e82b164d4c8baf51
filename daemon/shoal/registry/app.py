"""The aiohttp application: `/v2/`, manifests and blobs by tag or digest, HEAD and GET, Range.

Every answer is either verified content or an OCI error; a miss is a fast 404 so that containerd
falls back to its next host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from shoal import metrics
from shoal.oci.digest import Digest
from shoal.oci.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegistryError,
    Unsupported,
)
from shoal.oci.mediatypes import MAX_MANIFEST_BYTES, OCTET_STREAM, manifest_media_type
from shoal.oci.names import Reference, make_reference
from shoal.oci.ranges import parse_range
from shoal.registry.verify import HOLD_BACK, DigestMismatch, FileVerifier, verified_chunks
from shoal.routing.base import P2P_INFO_PATH
from shoal.sources import Blob, Descriptor, Relocatable, Source
from shoal.spool import SpoolBlob

log = logging.getLogger("shoal.registry")

# Set on requests between peers: a peer answers them from what it holds itself, never forwards.
PEER_HEADER = "X-Shoal-Peer"
# With PEER_HEADER: the sender chose this node to fetch the blob from upstream for the cluster.
FETCH_HEADER = "X-Shoal-Fetch"
# The same two, as query parameters, in the URLs a node redirects its containerd to.
PEER_QUERY = "shoal-peer"
FETCH_QUERY = "shoal-fetch"
_ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
WRITE_SLICE = 128 * 1024


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: Digest
    source: str


class TagResolver(Protocol):
    async def resolve(self, ref: Reference, sources: Sequence[Source]) -> Descriptor | None: ...


class SourceChain:
    """The Sources a request may use, in order: containerd's requests get `sources`, peers'
    requests `peer_sources` (what this node holds), and a peer's request that this node fetch
    for the cluster `fetch_sources`. `tags` decides what a tag means (default: first source)."""

    def __init__(
        self,
        sources: Sequence[Source],
        peer_sources: Sequence[Source] | None = None,
        fetch_sources: Sequence[Source] | None = None,
        tags: TagResolver | None = None,
    ) -> None:
        self.sources = list(sources)
        self.peer_sources = list(peer_sources if peer_sources is not None else sources[:1])
        self.fetch_sources = list(fetch_sources if fetch_sources is not None else self.peer_sources)
        self.tags = tags

    def for_request(self, request: web.Request) -> list[Source]:
        if not from_peer(request):
            return self.sources
        fetch = FETCH_HEADER in request.headers or FETCH_QUERY in request.query
        return self.fetch_sources if fetch else self.peer_sources


def from_peer(request: web.Request) -> bool:
    """Sent by a peer's shoal, or by a peer's containerd that its shoal redirected here."""
    return PEER_HEADER in request.headers or PEER_QUERY in request.query


class Registry:
    def __init__(self, chain: SourceChain) -> None:
        self.chain = chain
        self.verifier = FileVerifier()
        # Verified bytes of manifests the node holds; used only while the node still has them.
        self.verified_manifests = ByteCache(64 * 1024 * 1024)

    # -- lookups ---------------------------------------------------------------------------------

    async def resolve(self, sources: list[Source], ref: Reference) -> Descriptor:
        if self.chain.tags is not None:
            desc = await self.chain.tags.resolve(ref, sources)
            if desc is not None:
                return desc
        else:
            for source in sources:
                desc = await source.resolve(ref)
                if desc is not None:
                    return desc
        raise ManifestUnknown("manifest unknown", {"tag": ref.tag, "ns": ref.registry})

    async def find(self, sources: list[Source], ref: Reference, digest: Digest) -> Blob | None:
        for source in sources:
            blob = await source.find(ref, digest, "blob")
            if blob is not None:
                return blob
        return None

    async def manifest(
        self, sources: list[Source], ref: Reference, digest: Digest, hint: str | None
    ) -> Manifest:
        """Reads a whole manifest (small, bounded), verifies it and tells its media type."""
        for source in sources:
            blob = await source.find(ref, digest, "manifest")
            if blob is None or blob.size > MAX_MANIFEST_BYTES:
                continue
            body = self.verified_manifests.get(digest) if blob.source == "local" else None
            if body is None:
                try:
                    parts = [c async for c in verified_chunks(blob, digest, 0, blob.size)]
                except (TimeoutError, DigestMismatch, OSError, ConnectionError) as exc:
                    log.warning("manifest %s from %s unusable: %s", digest, source.name, exc)
                    continue
                body = b"".join(parts)
                if blob.source == "local":
                    self.verified_manifests.put(digest, body)
            media_type = manifest_media_type(body, hint)
            if media_type is None:
                break  # content exists but is no manifest
            return Manifest(body, media_type, digest, blob.source)
        raise ManifestUnknown("manifest unknown", {"digest": str(digest)})

    # -- handlers --------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise Unsupported("shoal is a pull-only mirror")
        if request.path in ("/v2", "/v2/"):
            return web.json_response({})
        match = _ROUTE.match(request.path)
        if match is None:
            raise NameUnknownPath()
        ns = request.query.get("ns")
        ref = make_reference(ns, match["name"], match["ref"])
        if match["kind"] == "manifests":
            return await self.serve_manifest(request, ref)
        if ref.digest is None:
            raise NameInvalid("blobs are addressed by digest")
        return await self.serve_blob(request, ref, ref.digest)

    async def serve_manifest(self, request: web.Request, ref: Reference) -> web.StreamResponse:
        sources = self.chain.for_request(request)
        hint = None
        digest = ref.digest
        if digest is None:
            if ref.image_name is None:
                raise ManifestUnknown("a tag needs ?ns=<registry>", {"tag": ref.tag})
            desc = await self.resolve(sources, ref)
            digest, hint = desc.digest, desc.media_type
        manifest = await self.manifest(sources, ref, digest, hint)
        size = len(manifest.body) if request.method == "GET" else 0
        metrics.count(manifest.source, "manifest", 200, size, to_peer=from_peer(request))
        headers = {
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": str(manifest.digest),
            "Content-Length": str(len(manifest.body)),
            "ETag": f'"{manifest.digest}"',
            "X-Shoal-Source": manifest.source,
        }
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        return web.Response(status=200, body=manifest.body, headers=headers)

    async def serve_blob(
        self, request: web.Request, ref: Reference, digest: Digest
    ) -> web.StreamResponse:
        blob = await self.find(self.chain.for_request(request), ref, digest)
        if blob is None:
            raise BlobUnknown("blob unknown", {"digest": str(digest)})
        rng = parse_range(request.headers.get("Range"), blob.size)
        start, end = (rng.start, rng.end + 1) if rng else (0, blob.size)
        headers = {
            "Content-Type": OCTET_STREAM,
            "Docker-Content-Digest": str(digest),
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
            "X-Shoal-Source": blob.source,
        }
        if rng is not None:
            headers["Content-Range"] = rng.content_range(blob.size)
        status = 206 if rng is not None else 200
        if request.method == "HEAD":
            headers["Content-Length"] = str(end - start)
            return web.Response(status=status, headers=headers)
        location = blob.location() if isinstance(blob, Relocatable) else None
        if location is not None and not from_peer(request):
            # containerd fetches from the peer itself, which verifies what it sends; containerd
            # comes back here with Range if that peer fails midway.
            metrics.count(blob.source, "blob", 307, 0)
            return web.Response(status=307, headers={"Location": location})
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        try:
            await self._send(request, resp, blob, digest, start, end)
        except DigestMismatch as exc:
            # Bytes already sent cannot be taken back; cutting the connection keeps the
            # response incomplete, so containerd never commits them.
            log.error("digest mismatch, connection cut: %s", exc)
            metrics.VERIFY_FAILURES.labels(blob.source).inc()
            _abort(request)
            return resp
        except Exception as exc:
            if not resp.prepared:
                raise  # nothing sent yet: an error answer lets containerd try its next host
            # Mid-body: containerd resumes with Range, from us or its next host.
            log.warning("%s blob %s broke off: %r", blob.source, digest, exc)
            _abort(request)
            return resp
        metrics.count(blob.source, "blob", status, end - start, to_peer=from_peer(request))
        return resp

    async def _send(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        blob: Blob,
        digest: Digest,
        start: int,
        end: int,
    ) -> None:
        path = blob.path
        transport = request.transport
        if path is not None and transport is not None and end - start > HOLD_BACK:
            await self._send_file(request, resp, path, blob, digest, start, end)
            return
        if isinstance(blob, SpoolBlob) and transport is not None:
            await self._send_spool(request, resp, blob, start, end)
            return
        await resp.prepare(request)
        # Only shoal's own spool verifies as it streams (see Blob.verified); the rest is hashed.
        chunks = (
            blob.open(start, end) if blob.verified else verified_chunks(blob, digest, start, end)
        )
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

    async def _send_spool(
        self, request: web.Request, resp: web.StreamResponse, blob: SpoolBlob, start: int, end: int
    ) -> None:
        """A spooled blob goes out by sendfile() as it lands on disk: the kernel copies, and
        the spool holds back the last piece until the digest matched."""
        try:
            fobj = open(blob.fetch.path, "rb")  # noqa: ASYNC230 - a local file
        except FileNotFoundError:  # retired (containerd has it) or failed since it was found
            raise BlobUnknown("blob left the spool", {"digest": str(blob.fetch.digest)}) from None
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        sent = 0
        with fobj:
            async for offset, count in blob.fetch.regions(start, end):
                assert request.transport is not None
                await loop.sendfile(request.transport, fobj, offset, count)
                sent += count
        if sent != end - start:
            raise ConnectionError(f"spool gave {sent} of {end - start} bytes")
        await resp.write_eof()

    async def _send_file(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        path: str,
        blob: Blob,
        digest: Digest,
        start: int,
        end: int,
    ) -> None:
        """Local files: the kernel copies all but the tail while a thread hashes the whole file."""
        with open(path, "rb") as fobj:  # noqa: ASYNC230 - opening a local file does not block
            if os.fstat(fobj.fileno()).st_size != blob.size:
                raise DigestMismatch(
                    digest, "size differs", os.fstat(fobj.fileno()).st_size, "local"
                )
            checked = asyncio.ensure_future(self.verifier.check(fobj.fileno(), digest, blob.size))
            try:
                await resp.prepare(request)
                loop = asyncio.get_running_loop()
                assert request.transport is not None
                await loop.sendfile(request.transport, fobj, start, end - start - HOLD_BACK)
                ok = await checked
            finally:
                if not checked.done():
                    checked.cancel()
            if not ok:
                raise DigestMismatch(digest, "differs", blob.size, "local")
            tail = await asyncio.to_thread(os.pread, fobj.fileno(), HOLD_BACK, end - HOLD_BACK)
            await resp.write(tail)
            await resp.write_eof()


class ByteCache:
    """Least-recently-used content by digest, bounded in bytes. It holds verified bytes
    themselves, never a claim about a file, so serving from it serves what was checked."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[Digest, bytes] = OrderedDict()

    def get(self, digest: Digest) -> bytes | None:
        body = self._items.get(digest)
        if body is not None:
            self._items.move_to_end(digest)
        return body

    def put(self, digest: Digest, body: bytes) -> None:
        if digest in self._items or len(body) > self.max_bytes:
            return
        self._items[digest] = body
        self.size += len(body)
        while self.size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)


class NameUnknownPath(NameUnknown):
    def __init__(self) -> None:
        super().__init__("endpoint not served by this pull-only mirror")


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def error_response(err: RegistryError, request: web.Request) -> web.Response:
    body = b"" if request.method == "HEAD" else err.body()
    return web.Response(
        status=err.status,
        body=body,
        content_type="application/json",
        headers={"Content-Length": str(len(err.body()))},
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OCI error; an unexpected one is logged and answered as a miss."""
    started = time.monotonic()
    try:
        resp = await handler(request)
    except RegistryError as err:
        if err.status == 404:
            metrics.MISSES.labels("manifest" if "/manifests/" in request.path else "blob").inc()
        resp = error_response(err, request)
    except web.HTTPException:
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path_qs)
        kind = "manifests" if "/manifests/" in request.path else "blobs"
        internal = ManifestUnknown if kind == "manifests" else BlobUnknown
        resp = error_response(internal("internal error; see logs"), request)
    took = time.monotonic() - started
    metrics.observe(request.method, took)
    if log.isEnabledFor(logging.DEBUG):  # an access log at debug level
        log.debug("%s %s %d %.3fs", request.method, request.path_qs, resp.status, took)
    return resp


async def _common_headers(request: web.Request, resp: web.StreamResponse) -> None:
    """Runs before any response's headers go out, streamed ones included."""
    resp.headers.update(_API_VERSION)
    ns = request.query.get("ns")
    if ns is not None:
        resp.headers["OCI-Namespace"] = ns[:255].replace("\r", "").replace("\n", "")


async def _not_found(request: web.Request) -> web.StreamResponse:
    raise NameUnknownPath()


def make_app(
    chain: SourceChain, p2p_info: Callable[[], dict[str, Any]] | None = None
) -> web.Application:
    """The pull API. `p2p_info`, when given, is served at P2P_INFO_PATH: peers that know only
    this node's address learn its libp2p identity there (dns and kubernetes bootstrap)."""
    registry = Registry(chain)
    app = web.Application(middlewares=[oci_errors], client_max_size=1024)
    if p2p_info is not None:
        info = p2p_info

        async def p2p(_: web.Request) -> web.Response:
            return web.json_response(info())

        app.router.add_get(P2P_INFO_PATH, p2p)
    app.router.add_route("*", "/v2", registry.handle)
    app.router.add_route("*", "/v2/{tail:.*}", registry.handle)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    app.on_response_prepare.append(_common_headers)
    return app
