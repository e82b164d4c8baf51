"""UpstreamSource: tags (HEAD, cache, staleness), verified manifests, streamed and resumed blobs."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.content.model import STREAMED
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.registry.app import SourceChain, make_app
from shoal.upstream import (
    UpstreamDigestMismatch,
    UpstreamIncomplete,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from shoal.upstream.manifests import get_manifest
from tests.fakes.registries import Servers, status
from tests.fakes.upstream import Clock, add_image, read_all, ref, source

# --- tags ------------------------------------------------------------------------------------


async def test_tag_head_gives_the_descriptor(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    async with source(reg) as src:
        desc = await src.resolve(ref(reg))
    assert desc is not None
    assert (desc.media_type, desc.digest, desc.size) == (
        mt.OCI_MANIFEST,
        image.digest,
        len(image.manifest),
    )
    assert [(s.method, s.path) for s in reg.seen] == [("HEAD", "/v2/team/app/manifests/v1")]
    accept = reg.seen[0].headers["accept"]
    for kind in (mt.OCI_INDEX, mt.OCI_MANIFEST, mt.DOCKER_MANIFEST_LIST, mt.DOCKER_MANIFEST):
        assert kind in accept


async def test_head_without_digest_gets_and_hashes(servers: Servers) -> None:
    reg = await servers.registry(head_digest=False)
    image = add_image(reg)
    async with source(reg) as src:
        desc = await src.resolve(ref(reg))
    assert desc is not None and desc.digest == image.digest and desc.size == len(image.manifest)
    assert [s.method for s in reg.seen] == ["HEAD", "GET"]


async def test_tag_get_with_a_lying_digest_header_is_refused(servers: Servers) -> None:
    reg = await servers.registry(head_digest=False)
    add_image(reg)
    body = reg.manifests["v1"][1]

    async def lying(request: web.Request) -> web.StreamResponse:
        wrong = str(Digest.of(b"something else"))
        headers = {"Docker-Content-Digest": wrong, "Content-Type": mt.OCI_MANIFEST}
        return web.Response(body=body, headers=headers)

    reg.faults = [status(200), lying]  # a HEAD without headers, then the GET
    async with source(reg) as src:
        with pytest.raises(UpstreamDigestMismatch):
            await src.lookup(ref(reg))


async def test_unknown_tag_is_none(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)
    async with source(reg) as src:
        assert await src.lookup(ref(reg, "v2")) is None
        assert await src.resolve(ref(reg, "v2")) is None  # the answer is cached too
        assert src.last_known(ref(reg, "v2")) is None
        # A digest reference has no tag to resolve.
        assert await src.resolve(ref(reg, str(Digest.of(b"x")))) is None
    assert len(reg.seen) == 1


async def test_tag_answers_are_shared_for_the_ttl(servers: Servers) -> None:
    clock = Clock()
    reg = await servers.registry()
    image = add_image(reg)
    async with source(reg, clock=clock, tag_ttl=30) as src:
        answers = await asyncio.gather(*[src.resolve(ref(reg)) for _ in range(20)])
        assert {a.digest for a in answers if a} == {image.digest} and all(answers)
        assert len(reg.seen) == 1  # twenty pods, one HEAD
        clock.now += 29
        assert await src.resolve(ref(reg)) == answers[0]
        assert len(reg.seen) == 1
        new = add_image(reg, layer=b"new layer")  # the tag moves upstream
        clock.now += 2
        moved = await src.resolve(ref(reg))
        assert moved is not None and moved.digest == new.digest
        assert len(reg.seen) == 2


async def test_the_last_answer_outlives_an_upstream_outage(servers: Servers) -> None:
    clock = Clock()
    reg = await servers.registry()
    image = add_image(reg)
    async with source(reg, clock=clock, tag_ttl=30) as src:
        assert await src.resolve(ref(reg)) is not None
        clock.now += 600
        reg.faults = [status(503)] * 6
        assert await src.resolve(ref(reg)) is None
        with pytest.raises(UpstreamUnavailable):
            await src.lookup(ref(reg))
        known = src.last_known(ref(reg))
        assert known is not None and known[0].digest == image.digest
        assert known[1] == pytest.approx(600)
        # Once upstream says the tag is gone, there is nothing stale to fall back to.
        reg.faults = []
        del reg.manifests["v1"]
        clock.now += 10  # the 503s opened its breaker: it is asked again after the cooldown
        assert await src.resolve(ref(reg)) is None
        assert src.last_known(ref(reg)) is None


# --- manifests -------------------------------------------------------------------------------


async def test_manifest_by_digest_is_verified(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    async with source(reg) as src:
        blob = await src.find(ref(reg), image.digest, "manifest")
        assert blob is not None and blob.size == len(image.manifest) and blob.delivery() == STREAMED
        assert await read_all(blob) == image.manifest
        assert blob.source == "upstream"
        # Planted: other bytes under this digest.
        reg.manifests[str(image.digest)] = (mt.OCI_MANIFEST, image.manifest + b" ")
        assert await src.find(ref(reg), image.digest, "manifest") is None
        assert await src.find(ref(reg), Digest.of(b"unknown"), "manifest") is None
    assert reg.seen[0].path == f"/v2/team/app/manifests/{image.digest}"


async def test_oversized_manifest_is_refused(servers: Servers) -> None:
    reg = await servers.registry()
    body = json.dumps({"schemaVersion": 2, "pad": "x" * mt.MAX_MANIFEST_BYTES}).encode()
    digest = reg.add_manifest(body, mt.OCI_MANIFEST, "big")
    async with source(reg) as src:
        assert await src.find(ref(reg), digest, "manifest") is None
        assert await src.resolve(ref(reg, "big")) is None


async def test_manifest_without_content_length_is_bounded_while_read(servers: Servers) -> None:
    reg = await servers.registry()
    body = b"{" + b" " * mt.MAX_MANIFEST_BYTES + b"}"
    digest = Digest.of(body)

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": mt.OCI_MANIFEST})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    reg.faults = [chunked, chunked]
    async with source(reg) as src:
        endpoint = src.endpoint(reg.host)
        assert endpoint is not None
        with pytest.raises(UpstreamInvalid, match="longer than"):
            await get_manifest(src.client, endpoint, "team/app", str(digest), digest)
        assert await src.find(ref(reg), digest, "manifest") is None


# --- blobs -----------------------------------------------------------------------------------


async def test_blob_is_streamed_whole(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    async with source(reg) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None and blob.size == len(image.layer) and blob.delivery() == STREAMED
        chunks = [c async for c in blob.open(0, blob.size)]
    assert b"".join(chunks) == image.layer
    assert len(chunks) > 1  # streamed, not one buffer
    assert [(s.method, s.headers.get("range")) for s in reg.seen] == [("HEAD", None), ("GET", None)]


async def test_missing_blob_and_bad_kind_are_none(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    async with source(reg) as src:
        assert await src.find(ref(reg), Digest.of(b"nope"), "blob") is None
        assert await src.find(ref(reg), image.layer_digest, "referrers") is None


async def test_blob_head_announcing_another_digest_is_refused(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    wrong = {"Docker-Content-Digest": str(image.config_digest), "Content-Length": "5"}
    reg.faults = [status(200, wrong)]
    async with source(reg) as src:
        assert await src.find(ref(reg), image.layer_digest, "blob") is None


async def test_blob_size_from_get_when_head_has_none(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)

    async def no_length(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write_eof()
        return resp

    reg.faults = [no_length]
    async with source(reg) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None and blob.size == len(image.layer)
    assert [s.method for s in reg.seen] == ["HEAD", "GET"]


async def test_open_from_an_offset_sends_range(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    async with source(reg) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
        assert await read_all(blob, 1000) == image.layer[1000:]
        assert await read_all(blob, 1000, 5000) == image.layer[1000:5000]
        assert await read_all(blob, 0, 10) == image.layer[:10]
        reg.honour_range = False  # answers 200 with everything: the prefix is skipped
        assert await read_all(blob, 1000, 5000) == image.layer[1000:5000]
    assert [s.headers.get("range") for s in reg.requests("GET")] == [
        "bytes=1000-",
        "bytes=1000-4999",
        "bytes=0-9",
        "bytes=1000-4999",
    ]


@pytest.mark.parametrize("honour_range", [True, False])
async def test_cut_body_is_resumed_with_range(servers: Servers, honour_range: bool) -> None:
    reg = await servers.registry(cuts=[700_000], honour_range=honour_range)
    image = add_image(reg)
    async with source(reg) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
        assert await read_all(blob) == image.layer
    gets = reg.requests("GET")
    assert len(gets) == 2 and "range" not in gets[0].headers
    resumed_at = int(gets[1].headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 700_000


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_that_stays_short_raises(servers: Servers, chunked: bool) -> None:
    reg = await servers.registry(cuts=[100_000] * 10, chunked_cuts=chunked)
    image = add_image(reg)
    async with source(reg) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
        got = bytearray()
        with pytest.raises(UpstreamIncomplete) as info:
            async for chunk in blob.open(0, blob.size):
                got += chunk
    assert isinstance(info.value, ConnectionError)  # what Source callers already handle
    assert len(got) < len(image.layer)
    assert len(reg.requests("GET")) == 4  # the first try and three resumes


async def test_blob_with_wrong_bytes_raises_before_the_last_chunk(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    corrupt = bytearray(image.layer)
    corrupt[-1] ^= 0xFF
    reg.blobs[str(image.layer_digest)] = bytes(corrupt)
    async with source(reg) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
        got = bytearray()
        with pytest.raises(UpstreamDigestMismatch):
            async for chunk in blob.open(0, blob.size):
                got += chunk
        assert 0 < len(got) < len(image.layer)
    async with source(reg, verify_blobs=False) as src:  # a consumer that verifies itself
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None and await read_all(blob) == bytes(corrupt)


async def test_wrong_length_or_content_range_is_refused(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)

    async def short_200(request: web.Request) -> web.StreamResponse:
        return web.Response(body=image.layer[:-1])

    async def wrong_range(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Range": f"bytes 0-9/{len(image.layer)}"}
        return web.Response(status=206, body=image.layer[:10], headers=headers)

    async with source(reg) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
        reg.faults = [short_200]
        with pytest.raises(UpstreamInvalid):
            await read_all(blob)
        reg.faults = [wrong_range]
        with pytest.raises(UpstreamInvalid):
            await read_all(blob, 100)


async def test_served_through_shoals_registry(servers: Servers) -> None:
    """The registry app (which verifies every byte again) serving from UpstreamSource."""
    reg = await servers.registry()
    image = add_image(reg)
    async with source(reg) as src:
        app = TestServer(make_app(SourceChain([src])), host="127.0.0.1")
        await app.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                ns = {"ns": reg.host}
                url = str(app.make_url("/v2/team/app"))
                async with http.head(f"{url}/manifests/v1", params=ns) as resp:
                    assert resp.status == 200
                    assert resp.headers["Docker-Content-Digest"] == str(image.digest)
                async with http.get(f"{url}/manifests/{image.digest}", params=ns) as resp:
                    assert await resp.read() == image.manifest
                async with http.get(f"{url}/blobs/{image.layer_digest}", params=ns) as resp:
                    assert resp.status == 200
                    assert await resp.read() == image.layer
                range_ = {"Range": "bytes=100-"}
                url_ = f"{url}/blobs/{image.layer_digest}"
                async with http.get(url_, params=ns, headers=range_) as resp:
                    assert resp.status == 206
                    assert await resp.read() == image.layer[100:]
                # Not on the allow-list: a fast 404, and the fake saw nothing of it.
                before = len(reg.seen)
                other = {"ns": "ghcr.io"}
                async with http.get(f"{url}/blobs/{image.layer_digest}", params=other) as resp:
                    assert resp.status == 404
                assert len(reg.seen) == before
        finally:
            await app.close()
