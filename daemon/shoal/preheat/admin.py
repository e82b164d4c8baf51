"""Starting a preheat: the admin endpoint the CLI calls, the node that chooses the holders, and
the request a holder gets.

- `POST /admin/preheat` on the metrics port, `{"ref", "replicas", "ttl"}`, answered only to a
  client on the node itself (its loopback or the node's own address: the CLI runs there).
- The node resolves the reference through its sources (the tag policy, as for a pull), reads
  the image's manifest, and ranks the members by rendezvous hashing of the platform manifest's
  digest, as `shoal.fetch.designate` does: the first holder is the image's designated fetcher,
  so the image comes from upstream once, in manifest order, and the others read it from there.
- Each holder gets `POST /_shoal/preheat` on its registry port (marked as a peer's request) and
  keeps the image (`keeper`). What a holder may be asked is bounded there (images, TTL).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from shoal.content.model import Descriptor, Source
from shoal.content.verify import verified_chunks
from shoal.load.names import BadName, normalize
from shoal.oci.digest import Digest
from shoal.oci.errors import RegistryError
from shoal.oci.manifest import children
from shoal.oci.mediatypes import (
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    manifest_media_type,
    parse_manifest,
)
from shoal.oci.names import Reference, make_reference
from shoal.preheat.keeper import Keeper, host_platform
from shoal.registry.protocol import peer_headers
from shoal.routing.base import Peer

log = logging.getLogger("shoal.preheat")

HOLD_PATH = "/_shoal/preheat"
ADMIN_PATH = "/admin/preheat"
MAX_REPLICAS = 64
ASK_TIMEOUT = 15.0


class Chain(Protocol):
    @property
    def sources(self) -> list[Source]: ...

    async def resolve(self, sources: list[Source], ref: Reference) -> Descriptor | None: ...


class LocalStore(Protocol):
    async def image_target(self, name: str) -> Descriptor | None: ...

    async def content_size(self, digest: Digest) -> int | None: ...

    def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]: ...

    def content_path(self, digest: Digest) -> str | None: ...


class PreheatedStore:
    """The node's store, whose tags also include the images it keeps for preheats."""

    def __init__(self, store: LocalStore, keeper: Keeper) -> None:
        self.store = store
        self.keeper = keeper

    async def image_target(self, name: str) -> Descriptor | None:
        return await self.store.image_target(name) or self.keeper.image_target(name)

    async def content_size(self, digest: Digest) -> int | None:
        return await self.store.content_size(digest)

    def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        return self.store.read(digest, start, end)

    def content_path(self, digest: Digest) -> str | None:
        return self.store.content_path(digest)


def ranked(key: Digest, candidates: list[Peer]) -> list[Peer]:
    """Members in rendezvous order for `key`: the first is `shoal.fetch.designate`'s choice."""
    return sorted(
        candidates,
        key=lambda p: hashlib.sha256(f"{p.id}/{key}".encode()).digest(),
        reverse=True,
    )


def parse_ref(text: str) -> Reference:
    try:
        name = normalize(text)
        return Reference(
            name.registry, name.repository, tag=name.tag,
            digest=Digest.parse(name.digest) if name.digest else None,
        )  # fmt: skip
    except (BadName, RegistryError) as exc:
        raise ValueError(str(exc)) from None


class Coordinator:
    def __init__(
        self,
        chain: Chain,
        keeper: Keeper,
        me: Callable[[], Peer | None],
        members: Callable[[], list[Peer]],
        sign: Callable[[str, str], dict[str, str]] | None = None,
    ) -> None:
        """`sign(method, path)`: the headers that prove this node a cluster member to the
        holder it asks (`shoal.tenancy.signer`); without it, only the peer marks."""
        self.chain = chain
        self.sign = sign
        self.keeper = keeper
        self.me = me
        self.members = members

    async def preheat(self, text: str, replicas: int, ttl: float) -> dict[str, Any]:
        ref = parse_ref(text)
        sources = self.chain.sources
        if ref.digest is None:
            target = await self.chain.resolve(sources, ref)
            if target is None:
                raise ValueError(f"{text}: no such tag (asked as a pull would)")
        else:
            body = await self._body(ref, ref.digest)
            media = manifest_media_type(body) or ""
            target = Descriptor(media, ref.digest, len(body))
        key = await self._platform_manifest(ref, target)
        me = self.me()
        candidates = [p for p in self.members() if me is None or p.id != me.id]
        if me is not None:
            candidates.append(me)
        holders = ranked(key, candidates)[: max(1, min(replicas, MAX_REPLICAS))]
        answers = await asyncio.gather(*(self._ask(h, me, ref, target, ttl) for h in holders))
        return {
            "ref": text,
            "manifest": str(target.digest),
            "platform_manifest": str(key),
            "asked": replicas,
            "holders": answers,
        }

    async def _body(self, ref: Reference, digest: Digest) -> bytes:
        for source in self.chain.sources:
            blob = await source.find(ref, digest, "manifest")
            if blob is not None and blob.size <= MAX_MANIFEST_BYTES:
                return b"".join([c async for c in verified_chunks(blob, digest, 0, blob.size)])
        raise ValueError(f"no source holds the manifest {digest}")

    async def _platform_manifest(self, ref: Reference, target: Descriptor) -> Digest:
        """The manifest this platform's nodes pull: the key their designated fetcher is for."""
        body = await self._body(ref, target.digest)
        media = manifest_media_type(body, target.media_type) or ""
        if media not in INDEX_TYPES:
            return target.digest
        wanted = host_platform()
        for child, _, plat in children(parse_manifest(body) or {}, media):
            if isinstance(plat, dict) and (plat.get("os"), plat.get("architecture")) == wanted:
                return Digest.parse(child.digest)
        raise ValueError(f"the index lists no manifest for {'/'.join(wanted)}")

    async def _ask(
        self, holder: Peer, me: Peer | None, ref: Reference, target: Descriptor, ttl: float
    ) -> dict[str, Any]:
        answer: dict[str, Any] = {"id": holder.id, "address": holder.address}
        if me is not None and holder.id == me.id:
            try:
                answer["state"] = self.keeper.start(ref, target, ttl).state
            except ValueError as exc:
                answer["error"] = str(exc)
            return answer
        payload = {
            "registry": ref.registry, "repository": ref.repository, "tag": ref.tag,
            "digest": str(target.digest), "media_type": target.media_type,
            "size": target.size, "ttl": ttl,
        }  # fmt: skip
        try:
            timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                url = f"http://{holder.address}{HOLD_PATH}"
                marks = self.sign("POST", HOLD_PATH) if self.sign else peer_headers(False)
                async with session.post(url, json=payload, headers=marks) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        answer["error"] = str(body.get("error", resp.status))
                    else:
                        answer["state"] = body.get("state", "")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            answer["error"] = f"unreachable: {exc!r}"
        return answer


def _same_host(request: web.Request) -> bool:
    """The client is on this node: loopback, or the node's own address it was reached at."""
    transport = request.transport
    if transport is None:
        return False
    peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not peer or not local:
        return False
    try:
        return ipaddress.ip_address(peer[0]).is_loopback or peer[0] == local[0]
    except ValueError:
        return False


def admin_routes(app: web.Application, coordinator: Coordinator, keeper: Keeper) -> None:
    async def preheat(request: web.Request) -> web.Response:
        if not _same_host(request):
            return web.json_response({"error": "only from the node itself"}, status=403)
        try:
            doc = json.loads(await request.content.read(64 * 1024))
            text, replicas = str(doc["ref"]), int(doc.get("replicas", 1))
            ttl = float(doc.get("ttl", 3600))
            result = await coordinator.preheat(text, replicas, ttl)
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(result)

    app.router.add_post(ADMIN_PATH, preheat)


async def hold(request: web.Request, keeper: Keeper) -> web.Response:
    """A peer chose this node to keep an image: `POST /_shoal/preheat` on the registry port."""
    try:
        doc = json.loads(await request.content.read(16 * 1024))
        ref = make_reference(doc["registry"], doc["repository"], doc["tag"] or doc["digest"])
        target = Descriptor(str(doc["media_type"]), Digest.parse(doc["digest"]), int(doc["size"]))
        job = keeper.start(ref, target, float(doc["ttl"]))
    except (ValueError, KeyError, TypeError, RegistryError) as exc:
        return web.json_response({"error": str(exc)[:300]}, status=400)
    return web.json_response({"state": job.state})
