"""Image records kept in memory while containerd's event stream says nothing changed: a HEAD by
tag costs no gRPC call then, and a deleted or moved tag is never served from memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal.catalog import Catalog
from shoal.containerd.imagecache import ImageCache
from shoal.containerd.model import ContainerdUnavailable, ContentInfo, Event, Image
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.manifest import RawDescriptor
from shoal.registry.app import make_app
from shoal.routing import Peer
from shoal.sources.chain import SourceChain
from shoal.sources.local import LocalSource
from shoal.sources.nodestore import ContainerdStore
from tests.fakes.images import NS
from tests.fakes.router import MemoryNetwork, MemoryRouter

NAME = f"{NS}/team/app:v1"
IMAGE_EVENT = Event("/images/update", "k8s.io", "containerd.services.images.v1.ImageUpdate")


def _manifest(n: int) -> bytes:
    return (
        b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"x","digest":"sha256:%s",'
        b'"size":%d},"layers":[]}' % (mt.OCI_MANIFEST.encode(), b"0" * 64, n)
    )


class FakeContainerd:
    """Images and blobs in memory, with a count of Images.Get calls; `down` refuses them all."""

    def __init__(self) -> None:
        self.images: dict[str, Image] = {}
        self.blobs: dict[str, bytes] = {}
        self.gets = 0
        self.down = False
        self.gate: asyncio.Event | None = None  # holds Get calls while cleared

    def tag(self, name: str, body: bytes) -> Digest:
        digest = Digest.of(body)
        self.blobs[str(digest)] = body
        self.images[name] = Image(name, RawDescriptor(mt.OCI_MANIFEST, str(digest), len(body)))
        return digest

    async def get_image(self, name: str) -> Image | None:
        self.gets += 1
        if self.down:
            raise ContainerdUnavailable("containerd get image: UNAVAILABLE")
        image = self.images.get(name)  # as containerd read it; the answer may arrive later
        if self.gate is not None:
            await self.gate.wait()
        return image

    async def info(self, digest: str | Digest) -> ContentInfo | None:
        if self.down:
            raise ContainerdUnavailable("containerd info: UNAVAILABLE")
        data = self.blobs.get(str(digest))
        return None if data is None else ContentInfo(str(digest), len(data))

    def blob_path(self, digest: str | Digest) -> str | None:
        return None

    async def open_blob(
        self, digest: str | Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        data = self.blobs[str(digest)]
        yield data[offset : len(data) if length is None else offset + length]


async def test_records_are_asked_once_while_the_stream_is_live() -> None:
    fake = FakeContainerd()
    fake.tag(NAME, _manifest(1))
    cache = ImageCache(fake)
    await cache.get_image(NAME)
    await cache.get_image(NAME)
    assert fake.gets == 2  # not live yet: the catalog has not resynced over a live stream
    cache.stream_up()
    for _ in range(5):
        image = await cache.get_image(NAME)
        assert image is not None and image.name == NAME
        assert await cache.get_image("reg/none:1") is None  # absence is kept too
    assert fake.gets == 4


async def test_any_change_or_a_stream_break_drops_everything() -> None:
    fake = FakeContainerd()
    first = fake.tag(NAME, _manifest(1))
    cache = ImageCache(fake)
    cache.stream_up()
    got = await cache.get_image(NAME)
    assert got is not None and got.target.digest == str(first)
    moved = fake.tag(NAME, _manifest(2))  # retagged; its event follows
    cache.changed(IMAGE_EVENT)
    got = await cache.get_image(NAME)
    assert got is not None and got.target.digest == str(moved)
    del fake.images[NAME]
    cache.stream_down()  # events may have been missed: nothing is kept until resynced
    assert await cache.get_image(NAME) is None
    fake.tag(NAME, _manifest(3))
    assert await cache.get_image(NAME) is not None
    assert fake.gets == 4


async def test_an_answer_asked_before_a_change_is_not_kept() -> None:
    fake = FakeContainerd()
    fake.tag(NAME, _manifest(1))
    cache = ImageCache(fake)
    cache.stream_up()
    fake.gate = asyncio.Event()
    asking = asyncio.ensure_future(cache.get_image(NAME))
    await asyncio.sleep(0)
    del fake.images[NAME]  # deleted while the old answer is on its way
    cache.changed(IMAGE_EVENT)
    fake.gate.set()
    await asking
    assert await cache.get_image(NAME) is None


async def test_containerd_down_is_not_here() -> None:
    fake = FakeContainerd()
    digest = fake.tag(NAME, _manifest(1))
    cache = ImageCache(fake)
    cache.stream_up()
    fake.down = True
    assert await cache.get_image(NAME) is None
    assert await cache.info(digest) is None
    fake.down = False
    assert await cache.get_image(NAME) is not None  # the miss was not kept


async def test_containerd_found_down_or_hung_is_not_asked_or_waited_for() -> None:
    fake = FakeContainerd()
    digest = fake.tag(NAME, _manifest(1))
    up = True
    cache = ImageCache(fake, timeout=0.05, available=lambda: up)
    up = False  # the health check found it down: not even asked
    assert await cache.get_image(NAME) is None and await cache.info(digest) is None
    assert fake.gets == 0
    up = True
    fake.gate = asyncio.Event()  # hung: answers never come
    assert await asyncio.wait_for(cache.get_image(NAME), 10) is None
    fake.gate.set()
    assert await cache.get_image(NAME) is not None


@pytest.fixture
async def registry() -> AsyncIterator[tuple[aiohttp.ClientSession, str, FakeContainerd, Any]]:
    fake = FakeContainerd()
    cache = ImageCache(fake)
    app = make_app(SourceChain([LocalSource(ContainerdStore(cache))]))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield session, str(server.make_url("/v2/team/app/manifests/v1")), fake, cache
    await server.close()


async def test_a_head_by_tag_costs_no_call_and_a_deleted_tag_is_a_miss(registry) -> None:
    session, url, fake, cache = registry
    digest = fake.tag(NAME, _manifest(1))
    cache.stream_up()
    for _ in range(3):
        async with session.head(url, params={"ns": NS}) as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Content-Digest"] == str(digest)
    assert fake.gets == 1
    moved = fake.tag(NAME, _manifest(2))
    cache.changed(IMAGE_EVENT)
    async with session.head(url, params={"ns": NS}) as resp:
        assert resp.headers["Docker-Content-Digest"] == str(moved)
    del fake.images[NAME]
    cache.changed(Event("/images/delete", "k8s.io", "containerd.services.images.v1.ImageDelete"))
    async with session.head(url, params={"ns": NS}) as resp:
        assert resp.status == 404


async def test_containerd_down_makes_tags_and_manifests_plain_misses(
    registry, caplog: pytest.LogCaptureFixture
) -> None:
    session, url, fake, _ = registry
    digest = fake.tag(NAME, _manifest(1))
    fake.down = True
    for ref in ("v1", str(digest)):
        async with session.get(url.replace("/v1", f"/{ref}"), params={"ns": NS}) as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


class FakeEvents:
    """containerd's event stream as the catalog's watcher uses it: `events` are delivered in
    order, `broken` ends the current subscription with an error."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | Exception] = asyncio.Queue()

    def subscription(self, filters: Any) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()  # a call: the watcher cancels it

    async def events_of(self, call: Any) -> AsyncGenerator[Event, None]:
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    async def publish(self, topic: str) -> None:
        await self.queue.put(Event(topic, "k8s.io", "google.protobuf.Empty"))


class Told:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def changed(self, event: Event) -> None:
        self.calls.append(f"changed {event.topic}")

    def stream_down(self) -> None:
        self.calls.append("down")

    def stream_up(self) -> None:
        self.calls.append("up")


async def _until(check: Any) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


async def test_the_catalog_tells_the_cache_what_the_stream_says() -> None:
    events, told = FakeEvents(), Told()
    router = MemoryRouter(MemoryNetwork(), Peer("me", "10.0.0.1:30020"))
    await router.start()

    async def keys(_: object) -> set[str]:
        return set()

    catalog = Catalog(events, router, 60, read_keys=keys, listener=told)  # type: ignore[arg-type]
    task = asyncio.ensure_future(catalog.run())
    try:
        await _until(lambda: told.calls == ["up"])  # only once the catalog resynced
        await events.queue.put(IMAGE_EVENT)
        await _until(lambda: told.calls[-1] == "changed /images/update")
        await events.queue.put(RuntimeError("stream broke"))
        await _until(lambda: "down" in told.calls)
        await _until(lambda: told.calls[-1] == "up")  # resubscribed and resynced
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
