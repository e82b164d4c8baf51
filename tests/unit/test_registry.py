"""The pull API as containerd sees it, served from an in-memory node store."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal.content.model import STREAMED, Delivery, SourceKind
from shoal.fetch.spool import Spool, SpoolBlob
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.registry.app import ByteCache, make_app
from shoal.sources.chain import SourceChain
from shoal.sources.local import LocalSource
from shoal.tenancy.admission import Admission
from shoal.tenancy.keys import ClusterKey
from shoal.tenancy.signer import PeerSigner
from tests.fakes.images import LAYER, NS, build_image
from tests.fakes.store import FileStore, MemoryStore


@pytest.fixture
async def served() -> AsyncIterator[tuple[aiohttp.ClientSession, str, MemoryStore, dict]]:
    store = MemoryStore()
    image = build_image(store)
    server = TestServer(make_app(SourceChain([LocalSource(store)])), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session, str(server.make_url("")), store, image
    await server.close()


async def _json_error(resp: aiohttp.ClientResponse) -> str:
    assert resp.content_type == "application/json"
    body = await resp.json()
    return body["errors"][0]["code"]


async def test_base_endpoint(served) -> None:
    session, url, _, _ = served
    async with session.get(f"{url}/v2/") as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_tag_head_gives_exact_descriptor(served) -> None:
    session, url, _, image = served
    async with session.head(f"{url}/v2/team/app/manifests/v1", params={"ns": NS}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(image["manifest"]))
        assert resp.headers["Docker-Content-Digest"] == str(image["mdig"])
        assert resp.headers["Content-Type"] == mt.OCI_MANIFEST
        assert resp.headers["OCI-Namespace"] == NS
        assert await resp.read() == b""


async def test_manifest_get_by_tag_and_digest(served) -> None:
    session, url, _, image = served
    for ref in ("v1", str(image["mdig"])):
        async with session.get(f"{url}/v2/team/app/manifests/{ref}", params={"ns": NS}) as resp:
            assert resp.status == 200
            assert await resp.read() == image["manifest"]
            assert resp.headers["Content-Type"] == mt.OCI_MANIFEST


async def test_tag_resolves_only_within_ns(served) -> None:
    session, url, _, _ = served
    for params in ({"ns": "docker.io"}, {"ns": "127.0.0.1:5001"}, {}):
        async with session.get(f"{url}/v2/team/app/manifests/v1", params=params) as resp:
            assert resp.status == 404
            assert await _json_error(resp) == "MANIFEST_UNKNOWN"


async def test_blob_is_not_a_manifest(served) -> None:
    session, url, _, image = served
    async with session.get(f"{url}/v2/team/app/manifests/{image['ldig']}") as resp:
        assert resp.status == 404
        assert await _json_error(resp) == "MANIFEST_UNKNOWN"


async def test_blob_get_whole_and_head(served) -> None:
    session, url, _, image = served
    blob_url = f"{url}/v2/team/app/blobs/{image['ldig']}"
    async with session.get(blob_url, params={"ns": NS}) as resp:
        assert resp.status == 200
        body = await resp.read()
        assert hashlib.sha256(body).hexdigest() == image["ldig"].hex
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert "Content-Encoding" not in resp.headers
    async with session.head(blob_url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(LAYER))
        assert resp.headers["Docker-Content-Digest"] == str(image["ldig"])


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=1000-", 1000, len(LAYER)),
        ("bytes=5-9", 5, 10),
        ("bytes=-100", len(LAYER) - 100, len(LAYER)),
    ],
)
async def test_blob_range(served, header: str, start: int, end: int) -> None:
    session, url, _, image = served
    async with session.get(
        f"{url}/v2/team/app/blobs/{image['ldig']}", headers={"Range": header}
    ) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(LAYER)}"
        assert await resp.read() == LAYER[start:end]


async def test_unsatisfiable_range(served) -> None:
    session, url, _, image = served
    async with session.get(
        f"{url}/v2/team/app/blobs/{image['ldig']}", headers={"Range": f"bytes={len(LAYER)}-"}
    ) as resp:
        assert resp.status == 416
        assert await _json_error(resp) == "RANGE_INVALID"


async def test_corrupt_content_is_never_completed(served) -> None:
    session, url, store, image = served
    bad = bytearray(LAYER)
    bad[-1] ^= 0xFF  # the very last byte: everything but the held-back tail would look fine
    store.blobs[image["ldig"]] = bytes(bad)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(f"{url}/v2/team/app/blobs/{image['ldig']}") as resp:
            await resp.read()
    # A corrupt manifest is a miss, so containerd falls back rather than fail.
    store.blobs[image["mdig"]] = image["manifest"] + b" "
    async with session.get(f"{url}/v2/team/app/manifests/v1", params={"ns": NS}) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/v2/team/app/blobs/sha256:" + "0" * 64, {}, 404, "BLOB_UNKNOWN"),
        ("/v2/team/app/blobs/sha256:xyz", {}, 400, "DIGEST_INVALID"),
        ("/v2/team/app/blobs/md5:" + "0" * 32, {}, 400, "DIGEST_INVALID"),
        ("/v2/Team/App/manifests/v1", {"ns": NS}, 400, "NAME_INVALID"),
        ("/v2/team/app/manifests/v1", {"ns": "evil.com/../x"}, 400, "NAME_INVALID"),
        ("/v2/team/app/manifests/v1", {"ns": "a\r\nb"}, 400, "NAME_INVALID"),
        ("/v2/team/app/manifests/-v1", {"ns": NS}, 400, "NAME_INVALID"),
        ("/v2/team/app/blobs/v1", {"ns": NS}, 400, "NAME_INVALID"),
        ("/v2/team/app/tags/list", {}, 404, "NAME_UNKNOWN"),
        ("/v2/_catalog", {}, 404, "NAME_UNKNOWN"),
        ("/elsewhere", {}, 404, "NAME_UNKNOWN"),
    ],
)
async def test_bad_requests_get_oci_errors(served, path, params, status, code) -> None:
    session, url, _, _ = served
    async with session.get(f"{url}{path}", params=params) as resp:
        assert resp.status == status
        assert await _json_error(resp) == code


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_writes_are_unsupported(served, method: str) -> None:
    session, url, _, image = served
    for path in (
        "/v2/team/app/manifests/v1",
        f"/v2/team/app/blobs/{image['ldig']}",
        "/v2/team/app/blobs/uploads/",
        "/v2/",
    ):
        async with session.request(method, f"{url}{path}") as resp:
            assert resp.status == 405, path
            assert await _json_error(resp) == "UNSUPPORTED"


async def test_peer_requests_use_peer_sources_only() -> None:
    """A request from a peer is answered from the node's own store only (no forwarding)."""
    empty, full = MemoryStore(), MemoryStore()
    image = build_image(full)
    chain = SourceChain([LocalSource(empty), LocalSource(full)], [LocalSource(empty)])
    key = ClusterKey(b"a cluster key of the registry tests")
    server = TestServer(make_app(chain, admission=Admission(key, lambda: "me")), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            path = f"/v2/team/app/blobs/{image['ldig']}"
            blob = server.make_url(path)
            async with session.head(blob) as resp:
                assert resp.status == 200
            signed = PeerSigner(key, lambda: "peer").headers("HEAD", path, None, False)
            async with session.head(blob, headers=signed) as resp:
                assert resp.status == 404
    finally:
        await server.close()


def test_digest_fixture_is_consistent() -> None:
    assert Digest.of(LAYER).hex == hashlib.sha256(LAYER).hexdigest()


async def test_local_files_are_verified_before_completion(tmp_path) -> None:
    store = FileStore(tmp_path)
    image = build_image(store)
    server = TestServer(make_app(SourceChain([LocalSource(store)])), host="127.0.0.1")
    await server.start_server()
    url = server.make_url(f"/v2/team/app/blobs/{image['ldig']}")
    try:
        async with aiohttp.ClientSession() as session:
            # Several at once share one hashing pass; each still gets every byte.
            async def get(headers: dict[str, str]) -> tuple[int, bytes]:
                async with session.get(url, headers=headers) as resp:
                    return resp.status, await resp.read()

            results = await asyncio.gather(*(get({}) for _ in range(4)),
                                           get({"Range": "bytes=100-"}))  # fmt: skip
            assert [r[0] for r in results] == [200, 200, 200, 200, 206]
            assert all(r[1] == LAYER for r in results[:4]) and results[4][1] == LAYER[100:]
            # Corrupt the file on disk (same size): the response must never complete.
            path = tmp_path / image["ldig"].hex
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 1
            path.write_bytes(bytes(data))
            with pytest.raises(aiohttp.ClientPayloadError):
                await get({})
    finally:
        await server.close()


def test_byte_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = ByteCache(10)
    a, b, c = (Digest.of(bytes([i])) for i in range(3))
    cache.put(a, b"aaaa")
    cache.put(b, b"bbbb")
    assert cache.get(a) == b"aaaa"  # a is now the most recent
    cache.put(c, b"cccc")  # 12 bytes > 10: b, the least recent, goes
    assert cache.get(b) is None and cache.get(a) == b"aaaa" and cache.get(c) == b"cccc"
    assert cache.size == 8
    cache.put(Digest.of(b"big"), b"x" * 11)  # larger than the whole cache: not kept
    assert cache.size == 8


class SlowBlob:
    """An upstream-like blob whose bytes come a piece at a time."""

    source = SourceKind.UPSTREAM

    def delivery(self) -> Delivery:
        return STREAMED

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        for pos in range(start, end, 256 * 1024):
            await asyncio.sleep(0.001)
            yield self.data[pos : min(end, pos + 256 * 1024)]


class SpoolingSource:
    """Like the upstream fetcher: every blob found goes through the spool."""

    name = SourceKind.UPSTREAM

    def __init__(self, spool: Spool, data: bytes) -> None:
        self.spool, self.data = spool, data

    async def resolve(self, ref: object) -> None:
        return None

    async def find(self, ref: object, digest: Digest, kind: str) -> SpoolBlob | None:
        fetch = self.spool.start(digest, SlowBlob(self.data))
        return None if fetch is None else SpoolBlob(fetch, SourceKind.UPSTREAM)


async def test_a_get_that_starts_a_spool_fetch_gets_the_whole_body(tmp_path) -> None:
    """The request that starts a fetch is served from the spool file at once: it must not be
    cut (containerd would retry) because the fetch had not created the file yet."""
    spool = Spool(tmp_path / "spool", 1 << 30)
    digest = Digest.of(LAYER)
    server = TestServer(make_app(SourceChain([SpoolingSource(spool, LAYER)])), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = server.make_url(f"/v2/team/app/blobs/{digest}")
            async with session.get(url, params={"ns": NS}) as resp:
                assert resp.status == 200
                assert await resp.read() == LAYER
    finally:
        await server.close()
        await spool.close()
