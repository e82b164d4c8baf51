"""UpstreamSource against a real docker-registry with `auth: silly` (anonymous Bearer tokens).

Pulls the standard test images (OCI manifest, Docker schema 2, multi-arch index) the way the
registry app does — resolve the tag, fetch the manifest by digest, stream every blob — and checks
every digest against what was built, plus what the registry and its token server saw.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.names import make_reference
from shoal.upstream import UpstreamSource
from tests.e2e.conftest import require_binaries
from tests.harness.upstream import Upstream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def silly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    require_binaries("docker-registry", "skopeo")
    up = Upstream.create(tmp_path_factory.mktemp("silly"), auth="silly", name="silly-upstream")
    yield up
    up.registry.stop()


@pytest.fixture
async def src(silly: Upstream) -> AsyncIterator[UpstreamSource]:
    async with UpstreamSource([silly.host], insecure=[silly.host]) as source:
        yield source


def token_scopes(up: Upstream, since: int = 0) -> list[str]:
    assert up.registry.token_server is not None
    scopes = []
    for _method, path in up.registry.token_server.requests()[since:]:
        scopes += parse_qs(urlsplit(path).query).get("scope", [])
    return scopes


async def pull(src: UpstreamSource, host: str, repo: str, tag: str) -> dict[str, int]:
    """Everything containerd would fetch for `repo:tag` on this node; sizes by digest."""
    ref = make_reference(host, repo, tag)
    desc = await src.resolve(ref)
    assert desc is not None, f"{repo}:{tag} did not resolve"
    fetched: dict[str, int] = {}
    pending = [(desc.digest, desc.media_type, desc.size)]
    while pending:
        digest, media_type, size = pending.pop()
        blob = await src.find(ref, digest, "manifest")
        assert blob is not None, digest
        body = b"".join([c async for c in blob.open(0, blob.size)])
        assert Digest.of(body) == digest and len(body) == size
        assert mt.detect_media_type(body) == media_type
        fetched[str(digest)] = size
        doc = json.loads(body)
        if media_type in mt.INDEX_TYPES:
            pending += [
                (Digest.parse(m["digest"]), m["mediaType"], m["size"]) for m in doc["manifests"]
            ]
            continue
        for item in [doc["config"], *doc["layers"]]:
            digest = Digest.parse(item["digest"])
            layer = await src.find(ref, digest, "blob")
            assert layer is not None and layer.size == item["size"]
            hasher = hashlib.sha256()
            async for chunk in layer.open(0, layer.size):
                hasher.update(chunk)
            assert hasher.hexdigest() == digest.hex
            fetched[str(digest)] = layer.size
    return fetched


@pytest.mark.parametrize("key", ["oci", "docker", "multi"])
async def test_pull_every_byte_through_the_token_flow(
    silly: Upstream, src: UpstreamSource, key: str
) -> None:
    tokens_before = len(token_scopes(silly))
    mark = silly.registry.mark()
    fetched = await pull(src, silly.host, silly.repos[key], silly.tag)
    image = silly.images[key]
    assert fetched == {d: b.size for d, b in image.blobs.items()}
    # One anonymous token for the repository's scope, reused for every request after it.
    assert token_scopes(silly)[tokens_before:] == [f"repository:{silly.repos[key]}:pull"]
    records = silly.registry.settle()[mark:]
    assert records and all(r.user_agent.startswith("shoal/") for r in records)
    assert [r.status for r in records].count(401) == 1
    assert all(r.status in (200, 401) for r in records)


async def test_tag_answers_are_cached(silly: Upstream, src: UpstreamSource) -> None:
    ref = make_reference(silly.host, silly.repos["oci"], silly.tag)
    mark = silly.registry.mark()
    first = await src.resolve(ref)
    assert first is not None and str(first.digest) == silly.digest("oci")
    for _ in range(5):
        assert await src.resolve(ref) == first
    heads = [r for r in silly.registry.settle()[mark:] if r.method == "HEAD" and r.status == 200]
    assert len(heads) == 1


async def test_ranges_against_the_real_registry(silly: Upstream, src: UpstreamSource) -> None:
    image = silly.images["oci"].for_platform()
    layer = image.layers[0]
    ref = make_reference(silly.host, silly.repos["oci"], silly.tag)
    blob = await src.find(ref, Digest.parse(layer.digest), "blob")
    assert blob is not None and blob.size == layer.size
    start = layer.size // 3
    mark = silly.registry.mark()
    got = b"".join([c async for c in blob.open(start, blob.size)])
    assert got == layer.data[start:]
    got = b"".join([c async for c in blob.open(10, 20)])
    assert got == layer.data[10:20]
    gets = [r for r in silly.registry.settle()[mark:] if r.method == "GET"]
    assert [(r.status, r.size) for r in gets] == [(206, layer.size - start), (206, 10)]


async def test_registry_not_allowed_is_never_contacted(silly: Upstream, tmp_path: Path) -> None:
    mark = silly.registry.mark()
    assert silly.registry.token_server is not None
    tokens = len(silly.registry.token_server.requests())
    ref = make_reference(silly.host, silly.repos["oci"], silly.tag)
    digest = Digest.parse(silly.digest("oci"))
    async with UpstreamSource(["docker.io"], insecure=[silly.host]) as other:
        assert await other.resolve(ref) is None
        assert await other.find(ref, digest, "manifest") is None
    assert silly.registry.settle()[mark:] == []
    assert len(silly.registry.token_server.requests()) == tokens
    # Control: the same calls with the registry allowed reach it.
    async with UpstreamSource([silly.host], insecure=[silly.host]) as allowed:
        assert await allowed.find(ref, digest, "manifest") is not None
    assert silly.registry.settle()[mark:]
