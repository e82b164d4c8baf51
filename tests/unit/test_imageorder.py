"""An image's blobs fetched from upstream in manifest order, by the image's designated node."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

from shoal.content.memory import MemoryBlob
from shoal.content.model import STREAMED, Delivery, SourceKind
from shoal.fetch.designate import Designation, designated
from shoal.fetch.imageorder import Images, OrderedFetches, image_parts
from shoal.fetch.sharing import SharedFetches
from shoal.fetch.spool import Spool
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.routing import Peer
from shoal.sources.upstream import UpstreamFetcher
from tests.fakes.router import MemoryNetwork, MemoryRouter

MIB = 1024 * 1024
REF = Reference(registry="registry.test", repository="team/app", tag=None, digest=None)


class Held:
    """A source Blob that sends its bytes only once the test lets it; records when it opened."""

    source = SourceKind.UPSTREAM

    def delivery(self) -> Delivery:
        return STREAMED

    def __init__(self, data: bytes, opened: list[Digest]) -> None:
        self.data, self.size, self.digest = data, len(data), Digest.of(data)
        self.opened = opened
        self.go = asyncio.Event()

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        self.opened.append(self.digest)
        await self.go.wait()
        yield self.data[start:end]


def manifest_of(blobs: list[bytes]) -> bytes:
    def desc(data: bytes, media_type: str) -> dict[str, object]:
        return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}

    config, *layers = blobs
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": desc(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [desc(layer, "application/vnd.oci.image.layer.v1.tar+gzip") for layer in layers],
    }).encode()  # fmt: skip


class World:
    """One node's ordered fetching, with fakes for upstream and for what nodes hold."""

    def __init__(self, tmp_path: Path, blobs: list[bytes], **kwargs: object) -> None:
        self.spool = Spool(tmp_path / "spool", 1 << 30)
        self.opened: list[Digest] = []
        self.sources = {Digest.of(b): Held(b, self.opened) for b in blobs}
        self.elsewhere: set[Digest] = set()  # held by this node's containerd or a peer
        self.asked_upstream: list[Digest] = []
        body = manifest_of(blobs)
        parts = image_parts(Digest.of(body), body)
        assert parts is not None
        self.parts = parts
        self.ordered = OrderedFetches(
            running=self.spool.get,
            needed=self.needed,
            upstream=self.upstream,
            start=self.spool.start,
            **kwargs,  # type: ignore[arg-type]
        )

    async def needed(self, ref: Reference, digest: Digest) -> bool:
        return digest not in self.elsewhere

    async def upstream(self, ref: Reference, digest: Digest) -> Held | None:
        self.asked_upstream.append(digest)
        return self.sources.get(digest)

    def release(self, data: bytes) -> None:
        self.sources[Digest.of(data)].go.set()

    async def settle(self) -> None:
        await asyncio.sleep(0.1)  # past the spool's write batching (50 ms)

    async def opened_once(self, data: bytes) -> None:
        for _ in range(200):
            if Digest.of(data) in self.opened:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("never opened")

    async def close(self) -> None:
        await self.ordered.close()
        await self.spool.close()


CONFIG = b'{"architecture": "amd64", "os": "linux"}'
LAYERS = [random.Random(i).randbytes(MIB + i) for i in range(3)]


async def test_layers_download_one_after_another_in_manifest_order(tmp_path: Path) -> None:
    world = World(tmp_path, [CONFIG, *LAYERS])
    await world.ordered.start(REF, world.parts)
    await world.settle()
    # Every blob has its Fetch (joinable, advertised) at once; the small config and the first
    # layer download, the others wait their turn.
    assert all(world.spool.get(Digest.of(b)) is not None for b in [CONFIG, *LAYERS])
    assert world.opened == [Digest.of(CONFIG), Digest.of(LAYERS[0])]
    world.release(LAYERS[1])  # upstream would send layer 2, but it has not been asked yet
    await world.settle()
    assert Digest.of(LAYERS[1]) not in world.opened
    world.release(LAYERS[0])
    await world.opened_once(LAYERS[1])  # and, layer 2 being all there, then layer 3
    assert world.opened[:3] == [Digest.of(b) for b in [CONFIG, *LAYERS[:2]]]
    world.release(LAYERS[2])
    world.release(CONFIG)
    for data in [CONFIG, *LAYERS]:
        fetch = world.spool.get(Digest.of(data))
        assert fetch is not None
        await fetch.over()
        assert fetch.complete
    assert world.opened == [Digest.of(b) for b in [CONFIG, *LAYERS]]
    await world.close()


async def test_blobs_held_anywhere_are_skipped_and_one_plan_serves_every_caller(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, [CONFIG, *LAYERS], streams=2)
    world.elsewhere.add(Digest.of(LAYERS[0]))
    await asyncio.gather(*(world.ordered.start(REF, world.parts) for _ in range(5)))
    await world.settle()
    assert world.spool.get(Digest.of(LAYERS[0])) is None  # a peer or containerd has it
    assert Digest.of(LAYERS[0]) not in world.asked_upstream
    assert len(world.asked_upstream) == 3  # each other blob once, for all five callers
    # Two streams: layers 2 and 3 both download at once.
    assert set(world.opened) == {Digest.of(b) for b in [CONFIG, LAYERS[1], LAYERS[2]]}
    await world.close()


async def test_a_waiting_blob_starts_after_hold_and_after_a_failed_predecessor(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, [CONFIG, *LAYERS], hold=0.2)
    await world.ordered.start(REF, world.parts)
    await world.settle()
    assert Digest.of(LAYERS[1]) not in world.opened
    await asyncio.sleep(0.3)  # layer 1 still downloading, but layer 2 has waited long enough
    assert Digest.of(LAYERS[1]) in world.opened

    other = World(tmp_path / "b", [CONFIG, *LAYERS])
    other.sources[Digest.of(LAYERS[0])].data = b"not the layer" + bytes(MIB)
    await other.ordered.start(REF, other.parts)
    await other.settle()
    other.release(LAYERS[0])
    await other.opened_once(LAYERS[1])  # the chain goes on past a bad blob
    assert other.spool.get(Digest.of(LAYERS[0])) is None
    await world.close()
    await other.close()


def test_images_remember_what_blobs_belong_to_and_ignore_non_images() -> None:
    now = [0.0]
    images = Images(max_images=2, ttl=10, clock=lambda: now[0])
    body = manifest_of([CONFIG, *LAYERS])
    digest = Digest.of(body)
    where = ("registry.test", "team/app")
    parts = images.learn(digest, body, where)
    assert parts is not None
    assert [d.digest for d in parts.blobs] == [Digest.of(b) for b in [CONFIG, *LAYERS]]
    assert images.image_of(Digest.of(LAYERS[2])) == parts
    assert images.get(digest, where) == parts
    assert images.get(digest, ("registry.test", "other/app")) is None  # not for other repos
    index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}).encode()
    assert images.learn(Digest.of(index), index) is None
    assert images.learn(Digest.of(b"{}"), b"{") is None
    now[0] = 11
    assert images.image_of(Digest.of(LAYERS[2])) is None  # expired

    small = Images(max_bytes=len(body) + 10)  # bodies are kept: bounded in bytes too
    small.learn(digest, body)
    other = manifest_of([CONFIG, LAYERS[0]])
    assert small.learn(Digest.of(other), other) is not None
    assert small.get(digest) is None and small.get(Digest.of(other)) is not None


class FakePeers:
    """PeerSource.fetch_at as the fetcher uses it: records who was asked for what."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []

    async def fetch_at(
        self, peer: Peer, ref: Reference, digest: Digest, kind: str
    ) -> MemoryBlob | None:
        self.asked.append((peer.id, kind, str(digest)))
        return MemoryBlob(b"x", SourceKind.PEER)


class FakeUpstream:
    name = "upstream"

    def __init__(self, body: bytes, blobs: dict[Digest, Held] | None = None) -> None:
        self.body = body
        self.blobs = blobs or {}
        self.manifest_gets = 0
        self.asked: list[Digest] = []

    def endpoint(self, registry: str | None) -> object:
        return object()

    async def resolve(self, ref: Reference) -> None:
        return None

    async def manifest(self, ref: Reference, digest: Digest) -> MemoryBlob | None:
        self.manifest_gets += 1
        await asyncio.sleep(0.01)
        return MemoryBlob(self.body)

    async def find(self, ref: Reference, digest: Digest, kind: str) -> MemoryBlob | Held | None:
        if kind == "manifest":
            return await self.manifest(ref, digest)
        self.asked.append(digest)
        return self.blobs.get(digest)


async def started_nodes(network: MemoryNetwork, n: int) -> tuple[list[Peer], list[MemoryRouter]]:
    peers = [Peer(f"12D3KooW{i}", f"10.0.0.{i}:30020") for i in range(n)]
    routers = [MemoryRouter(network, p) for p in peers]
    for router in routers:
        await router.start()
    return peers, routers


async def read_all(blob: object) -> bytes:
    return b"".join([c async for c in blob.open(0, blob.size)])  # type: ignore[attr-defined]


async def test_a_node_sends_an_images_blobs_to_the_images_designated_node(
    tmp_path: Path,
) -> None:
    body = manifest_of([CONFIG, *LAYERS])
    manifest = Digest.of(body)
    network = MemoryNetwork()
    peers, routers = await started_nodes(network, 6)
    image_node = designated(manifest, peers)
    me = next(r for r in routers if r.peer != image_node)
    # A blob of the image whose own designated node (without the image) would be another one.
    layer = next(d.digest for d in image_parts(manifest, body).blobs  # type: ignore[union-attr]
                 if designated(d.digest, peers) != image_node)  # fmt: skip
    spool = Spool(tmp_path / "spool", 1 << 30)
    upstream, fake_peers = FakeUpstream(body), FakePeers()
    ordered = OrderedFetches(running=spool.get, needed=None, upstream=None, start=None)  # type: ignore[arg-type]
    fetcher = UpstreamFetcher(
        upstream,
        SharedFetches(spool, me),
        Designation(me, lambda: me.peer, ordered.images),
        fake_peers,
        delegate=True,
        ordered=ordered,
    )
    got = await asyncio.gather(*(fetcher.find(REF, manifest, "manifest") for _ in range(3)))
    assert all(isinstance(b, MemoryBlob) and b.data == body for b in got)
    assert upstream.manifest_gets == 1  # concurrent requests shared one GET
    assert await fetcher.find(REF, layer, "blob") is not None
    # The designated node was asked for the manifest once (it then fetches the image in
    # order), and for the layer as the fetcher: not the layer's own designated node.
    assert fake_peers.asked == [
        (image_node.id, "manifest", str(manifest)),
        (image_node.id, "blob", str(layer)),
    ]
    await spool.close()


async def test_the_designated_node_fetches_the_image_it_is_told_of_in_order(
    tmp_path: Path,
) -> None:
    """What a node does when a peer tells it of an image: it fetches the manifest, then every
    blob nobody holds, in order, and answers the peers' requests for them from its spool."""
    blobs = [CONFIG, *LAYERS]
    body = manifest_of(blobs)
    manifest = Digest.of(body)
    network = MemoryNetwork()
    peers, routers = await started_nodes(network, 6)
    me = next(r for r in routers if r.peer == designated(manifest, peers))
    held_by_peer = Digest.of(LAYERS[0])
    await next(r for r in routers if r is not me).advertise([str(held_by_peer)])
    opened: list[Digest] = []
    upstream = FakeUpstream(body, {Digest.of(b): Held(b, opened) for b in blobs})
    spool = Spool(tmp_path / "spool", 1 << 30)
    sharing = SharedFetches(spool, me)
    ordered = OrderedFetches(
        running=spool.get,
        needed=sharing.needed,
        upstream=lambda ref, digest: upstream.find(ref, digest, "blob"),
        start=sharing.start,
    )
    fetcher = UpstreamFetcher(
        upstream,
        sharing,
        Designation(me, lambda: me.peer, ordered.images),
        FakePeers(),
        delegate=False,  # as for a peer's request
        ordered=ordered,
    )
    assert await fetcher.find(REF, manifest, "manifest") is not None
    last = await fetcher.find(REF, Digest.of(LAYERS[2]), "blob")
    assert last is not None and last.source == "upstream"
    for data in blobs:
        upstream.blobs[Digest.of(data)].go.set()
    assert (await read_all(last)) == LAYERS[2]
    # The layer a peer holds was left to that peer; the rest came in manifest order.
    assert opened == [Digest.of(b) for b in [CONFIG, LAYERS[1], LAYERS[2]]]
    assert held_by_peer not in upstream.asked
    assert str(Digest.of(LAYERS[1])) in network.providers  # advertised while it arrives
    await ordered.close()
    await spool.close()
