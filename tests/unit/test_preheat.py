"""Preheat without containerd: holders are the designated fetcher first, the admin endpoint
answers only the node itself, a kept image's tag resolves from the keeper, and a kept image is
released once the kubelet's pull names it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.containerd.model import ContentInfo, Image, Lease
from shoal.content.model import Descriptor
from shoal.fetch.designate import designated
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.manifest import RawDescriptor
from shoal.oci.names import make_reference
from shoal.preheat.admin import ADMIN_PATH, Coordinator, admin_routes, ranked
from shoal.preheat.keeper import Keeper
from shoal.routing import Peer
from shoal.sources.local import LocalSource
from tests.fakes.images import NS, build_image
from tests.fakes.store import MemoryStore


def test_holders_are_ranked_as_the_designated_fetcher_is_chosen() -> None:
    peers = [Peer(f"node-{i}", f"10.0.0.{i}:30020") for i in range(8)]
    for n in range(20):
        key = Digest.of(f"manifest {n}".encode())
        order = ranked(key, peers)
        assert order[0] == designated(key, peers)
        assert sorted(order, key=lambda p: p.id) == sorted(peers, key=lambda p: p.id)
        assert ranked(key, list(reversed(peers))) == order  # every node ranks alike


class FakeContainerd:
    """The calls the keeper makes, in memory."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.leases: dict[str, set[str]] = {}
        self.images: dict[str, Image] = {}

    async def create_lease(
        self, lease_id: str, *, expire: timedelta | None = None, labels: Any = None
    ) -> Lease:
        self.leases[lease_id] = set()
        return Lease(lease_id)

    async def delete_lease(self, lease_id: str, *, sync: bool = False) -> None:
        self.leases.pop(lease_id, None)

    async def add_lease_resource(self, lease_id: str, digest: str) -> None:
        self.leases[lease_id].add(digest)

    async def info(self, digest: str | Digest) -> ContentInfo | None:
        data = self.blobs.get(str(digest))
        return None if data is None else ContentInfo(str(digest), len(data))

    async def write_stream(
        self, chunks: AsyncIterator[bytes], total: int, expected: str, *, ref: str,
        lease: str | None = None, labels: Any = None,
    ) -> str:  # fmt: skip
        data = b"".join([c async for c in chunks])
        assert len(data) == total and str(Digest.of(data)) == expected
        self.blobs[expected] = data
        if lease:
            self.leases[lease].add(expected)
        return expected

    async def get_image(self, name: str) -> Image | None:
        return self.images.get(name)


class Chain:
    def __init__(self, store: MemoryStore) -> None:
        self.sources = [LocalSource(store)]


async def _kept(keeper: Keeper, target: Descriptor) -> None:
    for _ in range(200):
        if keeper.jobs[target.digest].state != "fetching":
            return
        await asyncio.sleep(0.01)


async def test_a_kept_image_answers_its_tag_until_the_kubelet_pulls_it() -> None:
    source = MemoryStore()
    image = build_image(source)  # a peer or upstream, as the chain would find it
    target = Descriptor(mt.OCI_MANIFEST, image["mdig"], len(image["manifest"]))
    containerd = FakeContainerd()
    changes: list[str] = []
    keeper = Keeper(containerd, Chain(source), on_change=lambda: changes.append("x"))  # type: ignore[arg-type]
    ref = make_reference(NS, "team/app", "v1")
    keeper.start(ref, target, ttl=600)
    await _kept(keeper, target)
    job = keeper.jobs[target.digest]
    assert job.state == "kept", job.error
    wanted = {str(image["mdig"]), str(image["cdig"]), str(image["ldig"])}
    assert set(containerd.blobs) == wanted
    assert containerd.leases[job.lease] == wanted  # everything under the expiring lease
    assert keeper.image_target(f"{NS}/team/app:v1") == target
    assert keeper.image_target(f"{NS}/team/other:v1") is None
    assert keeper.keys() == wanted | {f"{NS}/team/app:v1"}
    assert job.bytes_done == job.bytes_total > 0
    assert changes  # the catalog was told
    # The kubelet pulls: the image record names the same target; the lease is released.
    containerd.images[ref.image_name or ""] = Image(
        ref.image_name or "", RawDescriptor(mt.OCI_MANIFEST, str(target.digest), target.size)
    )
    await keeper.refresh()
    assert job.state == "pulled" and job.lease not in containerd.leases
    assert keeper.keys() == set() and keeper.image_target(f"{NS}/team/app:v1") is None


async def test_a_preheat_nobody_can_serve_fails_and_lets_go_of_its_lease() -> None:
    containerd = FakeContainerd()
    keeper = Keeper(containerd, Chain(MemoryStore()))  # type: ignore[arg-type]
    target = Descriptor(mt.OCI_MANIFEST, Digest.of(b"gone"), 4)
    keeper.start(make_reference(NS, "team/app", "v1"), target, ttl=60)
    await _kept(keeper, target)
    job = keeper.jobs[target.digest]
    assert job.state == "failed" and "no source holds" in job.error
    assert containerd.leases == {}


async def test_expired_preheats_stop_being_advertised() -> None:
    source = MemoryStore()
    image = build_image(source)
    now = [1000.0]
    keeper = Keeper(FakeContainerd(), Chain(source), clock=lambda: now[0])  # type: ignore[arg-type]
    target = Descriptor(mt.OCI_MANIFEST, image["mdig"], len(image["manifest"]))
    keeper.start(make_reference(NS, "team/app", "v1"), target, ttl=60)
    await _kept(keeper, target)
    assert keeper.keys()
    now[0] += 61
    assert keeper.keys() == set()
    await keeper.refresh()
    assert keeper.jobs[target.digest].state == "expired"


async def test_the_admin_endpoint_answers_only_the_node_itself() -> None:
    asked: list[tuple[str, int, float]] = []

    class Recording(Coordinator):
        async def preheat(self, text: str, replicas: int, ttl: float) -> dict[str, Any]:
            asked.append((text, replicas, ttl))
            return {"manifest": "sha256:" + "a" * 64, "holders": []}

    app = web.Application()
    keeper = Keeper(FakeContainerd(), Chain(MemoryStore()))  # type: ignore[arg-type]
    admin_routes(app, Recording(Chain(MemoryStore()), keeper, lambda: None, list), keeper)  # type: ignore[arg-type]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = server.make_url(ADMIN_PATH)
            body = json.dumps({"ref": "registry.test/app:v1", "replicas": 2, "ttl": 60})
            async with session.post(url, data=body) as resp:
                assert resp.status == 200
            async with session.post(url, data=b"{not json") as resp:
                assert resp.status == 400 and "error" in await resp.json()
    finally:
        await server.close()
    assert asked == [("registry.test/app:v1", 2, 60.0)]


def test_a_client_on_another_host_is_refused() -> None:
    from shoal.preheat import admin

    class Transport:
        def __init__(self, peer: str, local: str) -> None:
            self.info = {"peername": (peer, 5000), "sockname": (local, 30021)}

        def get_extra_info(self, name: str) -> Any:
            return self.info[name]

    class Request:
        def __init__(self, peer: str, local: str) -> None:
            self.transport = Transport(peer, local)

    same = admin._same_host
    assert same(Request("127.0.0.1", "127.0.0.1"))  # type: ignore[arg-type]
    assert same(Request("10.0.0.5", "10.0.0.5"))  # type: ignore[arg-type]
    assert not same(Request("10.0.0.6", "10.0.0.5"))  # type: ignore[arg-type]
    assert not same(Request("::ffff:10.0.0.6", "::ffff:10.0.0.5"))  # type: ignore[arg-type]


@pytest.mark.parametrize("replicas", [1, 3])
async def test_the_coordinator_asks_the_top_ranked_members(replicas: int) -> None:
    source = MemoryStore()
    image = build_image(source)
    me = Peer("me", "10.0.0.1:30020")
    others = [Peer(f"p{i}", f"10.0.0.{i + 2}:30020") for i in range(4)]

    class Resolving:
        sources = [LocalSource(source)]

        async def resolve(self, sources: object, ref: object) -> Descriptor:
            return Descriptor(mt.OCI_MANIFEST, image["mdig"], len(image["manifest"]))

    keeper = Keeper(FakeContainerd(), Chain(source))  # type: ignore[arg-type]
    asked: list[str] = []

    class Asking(Coordinator):
        async def _ask(self, holder: Peer, *args: object) -> dict[str, Any]:
            asked.append(holder.id)
            return {"id": holder.id, "address": holder.address, "state": "fetching"}

    coordinator = Asking(Resolving(), keeper, lambda: me, lambda: list(others))  # type: ignore[arg-type]
    answer = await coordinator.preheat(f"{NS}/team/app:v1", replicas, 60)
    assert answer["manifest"] == str(image["mdig"])
    assert asked == [p.id for p in ranked(image["mdig"], [*others, me])][:replicas]
