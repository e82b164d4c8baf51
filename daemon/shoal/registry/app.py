"""The pull API's routes: `/v2/`, manifests and blobs by tag or digest, HEAD and GET, Range.

Every answer is either verified content or an OCI error; a miss is a fast 404 so that containerd
falls back to its next host.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from shoal import metrics
from shoal.content.model import Source, SourceKind
from shoal.content.verify import DigestMismatch, verified_chunks
from shoal.herd.serving import Herd, Refer
from shoal.observe.middleware import recording
from shoal.observe.recorder import Recorder
from shoal.oci.digest import Digest
from shoal.oci.errors import BlobUnknown, ManifestUnknown, NameInvalid, Unsupported
from shoal.oci.mediatypes import MAX_MANIFEST_BYTES, manifest_media_type
from shoal.oci.names import Reference, make_reference
from shoal.registry.blobserver import BlobServer
from shoal.registry.middleware import NameUnknownPath, common_headers, not_found, oci_errors
from shoal.registry.protocol import P2P_INFO_PATH, Asker
from shoal.registry.transfer import PeerTransfer
from shoal.sources.chain import SourceChain
from shoal.tenancy.admission import Admission, admitted, sender_of

log = logging.getLogger("shoal.registry")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: Digest
    source: SourceKind


class Registry:
    def __init__(self, chain: SourceChain, transfer: PeerTransfer, herd: Herd | None) -> None:
        self.chain = chain
        self.herd = herd  # the bound on peers served each blob at once, with referrals
        self.blobs = BlobServer(transfer)
        # Verified bytes of manifests the node holds; used only while the node still has them.
        self.verified_manifests = ByteCache(64 * 1024 * 1024)

    async def manifest(
        self, sources: list[Source], ref: Reference, digest: Digest, hint: str | None
    ) -> Manifest:
        """Reads a whole manifest (small, bounded), verifies it and tells its media type."""
        for source in sources:
            blob = await source.find(ref, digest, "manifest")
            if blob is None or blob.size > MAX_MANIFEST_BYTES:
                continue
            local = blob.source is SourceKind.LOCAL
            body = self.verified_manifests.get(digest) if local else None
            if body is None:
                try:
                    parts = [c async for c in verified_chunks(blob, digest, 0, blob.size)]
                except (TimeoutError, DigestMismatch, OSError, ConnectionError) as exc:
                    log.warning("manifest %s from %s unusable: %s", digest, source.name, exc)
                    continue
                body = b"".join(parts)
                if local:
                    self.verified_manifests.put(digest, body)
            media_type = manifest_media_type(body, hint)
            if media_type is None:
                break  # content exists but is no manifest
            return Manifest(body, media_type, digest, blob.source)
        raise ManifestUnknown("manifest unknown", {"digest": str(digest)})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise Unsupported("shoal is a pull-only mirror")
        if request.path in ("/v2", "/v2/"):
            return web.json_response({})
        match = _ROUTE.fullmatch(request.path)
        if match is None:
            raise NameUnknownPath()
        ns = request.query.get("ns")
        ref = make_reference(ns, match["name"], match["ref"])
        who = admitted(request)
        if match["kind"] == "manifests":
            return await self.serve_manifest(request, ref, who)
        if ref.digest is None:
            raise NameInvalid("blobs are addressed by digest")
        if request.method == "GET":
            self.blobs.transfer.asking(ref.digest, request.headers.get("Range"), who)
        blob = await self.chain.find_blob(self.chain.for_asker(who), ref, ref.digest)
        if blob is None:
            raise BlobUnknown("blob unknown", {"digest": str(ref.digest)})
        if who is Asker.CONTAINERD or self.herd is None:
            return await self.blobs.serve(request, blob, ref.digest, who)
        key = str(ref.digest)
        try:
            slot = self.herd.admit(request, key, blob.size, sender_of(request))
        except Refer as refer:
            return refer.response()
        try:
            return await self.blobs.serve(request, blob, ref.digest, who, self.herd.headers(key))
        finally:
            self.herd.release(slot)

    async def serve_manifest(
        self, request: web.Request, ref: Reference, who: Asker
    ) -> web.StreamResponse:
        sources = self.chain.for_asker(who)
        hint = None
        digest = ref.digest
        if digest is None:
            if ref.image_name is None:
                raise ManifestUnknown("a tag needs ?ns=<registry>", {"tag": ref.tag})
            desc = await self.chain.resolve(sources, ref)
            if desc is None:
                raise ManifestUnknown("manifest unknown", {"tag": ref.tag, "ns": ref.registry})
            digest, hint = desc.digest, desc.media_type
        manifest = await self.manifest(sources, ref, digest, hint)
        size = len(manifest.body) if request.method == "GET" else 0
        to_peer = who is not Asker.CONTAINERD
        metrics.count(manifest.source, "manifest", 200, size, to_peer=to_peer)
        headers = {
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": str(manifest.digest),
            "Content-Length": str(len(manifest.body)),
            "ETag": f'"{manifest.digest}"',
            "X-Shoal-Source": manifest.source.value,
        }
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        return web.Response(status=200, body=manifest.body, headers=headers)


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


def make_app(
    chain: SourceChain,
    p2p_info: Callable[[], dict[str, Any]] | None = None,
    transfer: PeerTransfer | None = None,
    admission: Admission | None = None,
    recorder: Recorder | None = None,
    posts: Mapping[str, Handler] | None = None,
    herd: Herd | None = None,
) -> web.Application:
    """The pull API. `p2p_info`, when given, is served at P2P_INFO_PATH: peers that know only
    this node's address learn its libp2p identity there (dns and kubernetes bootstrap).
    `transfer` decides whether containerd is sent to a peer for a blob (default: as the
    `--peer-transfer` default). `admission` decides who may ask (default: this node's
    containerd only, over loopback). `recorder` is told of every answer (the status page).
    `posts`: node-to-node POST endpoints by path (`/_shoal/…`), e.g. a preheat request.
    `herd`: how many peers may be sent one blob at once (None: no bound)."""
    registry = Registry(chain, transfer or PeerTransfer(), herd)
    admit = admission or Admission(None, lambda: "")
    middlewares: list[Middleware] = [admit.middleware, oci_errors]
    if recorder is not None:
        middlewares.insert(0, recording(recorder))  # outermost: it sees the final answer
    app = web.Application(middlewares=middlewares, client_max_size=1024)
    if p2p_info is not None:
        info = p2p_info

        async def p2p(_: web.Request) -> web.Response:
            return web.json_response(info())

        app.router.add_get(P2P_INFO_PATH, p2p)
    for path, post in (posts or {}).items():
        app.router.add_post(path, post)
    app.router.add_route("*", "/v2", registry.handle)
    app.router.add_route("*", "/v2/{tail:.*}", registry.handle)
    app.router.add_route("*", "/{tail:.*}", not_found)
    app.on_response_prepare.append(common_headers)
    return app
