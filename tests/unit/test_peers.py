"""Serving from peers: found through a router, hedged, resumed, verified, never forwarded."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from shoal.registry.app import make_app
from shoal.registry.protocol import PEER_HEADER
from shoal.sources.chain import SourceChain
from shoal.sources.local import LocalSource
from shoal.tenancy.signer import PeerSigner
from shoal.tenancy.tokens import CAP_QUERY
from tests.fakes.images import LAYER, NS, build_image
from tests.fakes.signing import KEY, admission
from tests.fakes.store import MemoryStore
from tests.unit.peer_cluster import Cluster, get


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    await c.close()


async def test_blob_and_tag_come_from_a_peer(cluster: Cluster) -> None:
    full = MemoryStore()
    image = build_image(full)
    _, router_a = await cluster.node("a", full)
    await router_a.advertise([str(image["ldig"]), str(image["mdig"]), f"{NS}/team/app:v1"])
    b, _ = await cluster.node("b")
    status, body, headers = await get(str(b.make_url(f"/v2/team/app/blobs/{image['ldig']}")))
    assert status == 200 and body == LAYER and headers["X-Shoal-Source"] == "peer"
    status, body, headers = await get(str(b.make_url(f"/v2/team/app/manifests/v1?ns={NS}")))
    assert status == 200 and body == image["manifest"]
    # The tag key is scoped to the registry: the same repo:tag of another registry is a miss.
    status, _, _ = await get(str(b.make_url("/v2/team/app/manifests/v1?ns=docker.io")))
    assert status == 404


async def test_peer_requests_are_never_forwarded(cluster: Cluster) -> None:
    full = MemoryStore()
    image = build_image(full)
    _, router_a = await cluster.node("a", full)
    await router_a.advertise([str(image["ldig"])])
    b, _ = await cluster.node("b")
    path = f"/v2/team/app/blobs/{image['ldig']}"
    signed = PeerSigner(KEY, lambda: "c").headers("GET", path, None, False)
    assert PEER_HEADER in signed
    status, _, _ = await get(str(b.make_url(path)), signed)
    assert status == 404  # b lacks it and must not ask a, even though a has it
    assert str(image["ldig"]) not in cluster.lookups


async def test_redirect_sends_the_client_to_the_peer_which_serves_it_itself(
    cluster: Cluster,
) -> None:
    full = MemoryStore()
    image = build_image(full)
    a, router_a = await cluster.node("a", full)
    await router_a.advertise([str(image["ldig"]), str(image["mdig"])])
    b, _ = await cluster.node("b", redirect=True)
    url = str(b.make_url(f"/v2/team/app/blobs/{image['ldig']}?ns={NS}"))
    status, _, headers = await get(url, follow=False)
    assert status == 307
    location = URL(headers["Location"])
    assert (location.host, location.port) == ("127.0.0.1", a.port)
    assert location.query["ns"] == NS and CAP_QUERY in location.query
    # At the peer, the redirected request is a peer request: answered from its own content.
    status, body, headers = await get(str(location))
    assert status == 200 and body == LAYER and headers["X-Shoal-Source"] == "local"
    # A resumed download comes back with Range; the peer answers it after the redirect.
    status, body, headers = await get(url, {"Range": "bytes=5-"})
    assert status == 206 and body == LAYER[5:]
    assert headers["Content-Range"] == f"bytes 5-{len(LAYER) - 1}/{len(LAYER)}"
    # HEAD is answered here (no second connection), manifests are relayed.
    status, _, headers = await get(url, method="HEAD", follow=False)
    assert status == 200 and int(headers["Content-Length"]) == len(LAYER)
    murl = str(b.make_url(f"/v2/team/app/manifests/{image['mdig']}?ns={NS}"))
    status, body, _ = await get(murl, follow=False)
    assert status == 200 and body == image["manifest"]


async def test_a_redirected_request_is_never_forwarded_again(cluster: Cluster) -> None:
    """A node that lost the blob since it was found there answers 404, never redirects on:
    containerd then tries its next host instead of following a chain."""
    full = MemoryStore()
    image = build_image(full)
    _, router_a = await cluster.node("a", full)
    await router_a.advertise([str(image["ldig"])])
    c, _ = await cluster.node("c", redirect=True)
    path = f"/v2/team/app/blobs/{image['ldig']}"
    cap = PeerSigner(KEY, lambda: "b").redirect_query("c", path, NS, False)
    url = str(c.make_url(path).with_query({"ns": NS, **cap}))
    status, body, _ = await get(url, follow=False)
    assert status == 404 and b"BLOB_UNKNOWN" in body
    assert str(image["ldig"]) not in cluster.lookups


async def test_slow_peer_is_hedged(cluster: Cluster) -> None:
    """The first holder never answers; the hedged second one serves, long before the first
    would have timed out (here 20 s), so the pull does not wait on the stalled peer."""
    full = MemoryStore()
    image = build_image(full)
    stalled = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        stalled.set()
        await asyncio.sleep(60)
        return web.Response(status=404)

    slow_app = web.Application()
    slow_app.router.add_route("*", "/{tail:.*}", stall)
    _, slow = await cluster.node("slow", app=slow_app)
    _, good = await cluster.node("good", full)
    for router in (slow, good):  # the slow one first in the provider list
        await router.advertise([str(image["ldig"])])
    b, _ = await cluster.node("b", header_timeout=20.0)
    status, body, _ = await asyncio.wait_for(
        get(str(b.make_url(f"/v2/team/app/blobs/{image['ldig']}"))), timeout=15
    )
    assert status == 200 and body == LAYER
    assert stalled.is_set()  # the stalled peer was asked first


async def test_body_cut_midway_resumes_from_another_peer(cluster: Cluster) -> None:
    full = MemoryStore()
    image = build_image(full)
    ranges: list[str | None] = []

    async def flaky(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        resp.content_length = len(LAYER)
        if request.method == "HEAD":
            return resp
        await resp.prepare(request)
        await resp.write(LAYER[:1_000_000])
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def record(request: web.Request, _: web.StreamResponse) -> None:
        ranges.append(request.headers.get("Range"))

    flaky_app = web.Application()
    flaky_app.router.add_route("*", "/{tail:.*}", flaky)
    good_app = make_app(SourceChain([LocalSource(full)]), admission=admission("good"))
    good_app.on_response_prepare.append(record)
    _, bad = await cluster.node("flaky", app=flaky_app)
    _, good = await cluster.node("good", app=good_app)
    for router in (bad, good):
        await router.advertise([str(image["ldig"])])
    b, _ = await cluster.node("b")
    status, body, _ = await get(str(b.make_url(f"/v2/team/app/blobs/{image['ldig']}")))
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == image["ldig"].hex
    resumed = [r for r in ranges if r]
    assert len(resumed) == 1 and resumed[0].endswith(f"-{len(LAYER) - 1}")
    first = int(resumed[0].removeprefix("bytes=").split("-")[0])
    assert 0 < first <= 1_000_000  # resumed where the cut peer stopped, not from zero


async def test_wrong_bytes_from_a_peer_never_complete(cluster: Cluster) -> None:
    liar = MemoryStore()
    image = build_image(liar)
    bad = bytearray(LAYER)
    bad[-10] ^= 1
    liar.blobs[image["ldig"]] = bytes(bad)
    _, router = await cluster.node("liar", liar)
    await router.advertise([str(image["ldig"])])
    b, _ = await cluster.node("b")
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(str(b.make_url(f"/v2/team/app/blobs/{image['ldig']}")))


async def test_total_miss_is_fast_and_remembered(cluster: Cluster) -> None:
    b, _ = await cluster.node("b")
    url = str(b.make_url("/v2/team/app/blobs/sha256:" + "1" * 64))
    for _ in range(3):
        status, body, _ = await get(url)
        assert status == 404 and b"BLOB_UNKNOWN" in body
    assert cluster.lookups.count("sha256:" + "1" * 64) == 1  # negative answer cached
