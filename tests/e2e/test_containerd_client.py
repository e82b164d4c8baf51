"""shoal.containerd against a real containerd started by the test (tests/harness), of the run's
version (SHOAL_CONTAINERD)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import grpc
import pytest

from shoal.containerd import ContainerdError, ContainerdNotFound, Event, watch
from shoal.containerd.api import content_pb2
from shoal.containerd.ingest import IngestClient as ContainerdClient
from shoal.oci.mediatypes import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.harness import images
from tests.harness.containerd import ContainerdNode
from tests.harness.upstream import Upstream

from .conftest import NodeFactory

pytestmark = pytest.mark.e2e


@pytest.fixture
def node(node_factory: NodeFactory) -> ContainerdNode:
    return node_factory("cc")


@pytest.fixture
async def client(node: ContainerdNode) -> AsyncIterator[ContainerdClient]:
    c = ContainerdClient(str(node.socket))
    await c.connect()
    try:
        yield c
    finally:
        await c.close()


async def chunks(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in it])


async def eventually(check: Callable[[], bool], limit: float = 20, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def pull(node: ContainerdNode, ref: str) -> None:
    await asyncio.to_thread(node.pull, ref, via_hosts=False, plain_http=True)


async def test_version_and_content_root(node: ContainerdNode, client: ContainerdClient) -> None:
    # containerd says `1.7.24~ds1` (Debian) or `2.3.7+unknown` (built from its module).
    assert re.match(rf"^v?{re.escape(node.runtime.version)}\b", await client.version())
    assert await client.content_root() == str(node.content_root)


async def test_write_read_and_leases(node: ContainerdNode, client: ContainerdClient) -> None:
    lease = await client.create_lease(expire=timedelta(hours=1), labels={"shoal.test": "1"})
    listed = {le.id: le for le in await client.list_leases()}
    assert listed[lease.id].labels["shoal.test"] == "1"
    assert "containerd.io/gc.expire" in listed[lease.id].labels

    data = os.urandom(3 * 1024 * 1024 + 4321)  # several Write and Read messages
    digest = await client.write_blob(data, labels={"shoal.test/kind": "blob"}, lease=lease.id)
    info = await client.info(digest)
    assert info is not None and info.size == len(data)
    assert info.labels["shoal.test/kind"] == "blob"
    assert info.created_at is not None
    assert digest in {i.digest for i in await client.list_content()}
    # Writing present content again is a no-op, not an error.
    assert await client.write_blob(data, lease=lease.id) == digest
    # containerd checks the digest on commit.
    with pytest.raises(ContainerdError) as err:
        await client.write_blob(b"other bytes", expected="sha256:" + "2" * 64, lease=lease.id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION

    # gRPC Read: offsets in responses are relative to the requested one.
    assert await chunks(client.read(digest)) == data
    assert await chunks(client.read(digest, 1_500_000, 1_200_000)) == data[1_500_000:2_700_000]
    assert await chunks(client.read(digest, len(data) - 10, 1000)) == data[-10:]
    assert await chunks(client.read(digest, len(data))) == b""
    with pytest.raises(ContainerdError) as err:
        await chunks(client.read(digest, len(data) + 1))
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE

    # From disk.
    assert client.blob_path(digest) == str(node.blob_path(digest))
    assert await chunks(client.open_blob(digest)) == data
    assert await chunks(client.open_blob(digest, 123, 456_789)) == data[123 : 123 + 456_789]

    # Gone: None from info, ContainerdNotFound from reads (disk falls back to gRPC).
    absent = "sha256:" + "0" * 64
    assert await client.info(absent) is None
    with pytest.raises(ContainerdNotFound):
        await chunks(client.read(absent))
    with pytest.raises(ContainerdNotFound):
        await chunks(client.open_blob(absent))

    # Without the lease nothing holds the blob: GC removes it.
    await client.delete_lease(lease.id, sync=True)
    await client.delete_lease(lease.id)  # already gone: fine
    assert await client.info(digest) is None
    assert lease.id not in {le.id for le in await client.list_leases()}


async def test_ingest_status_and_abort(client: ContainerdClient) -> None:
    ref = "layer-sha256:" + "1" * 64
    call = client._api.content.Write(metadata=client._metadata)
    await call.write(
        content_pb2.WriteContentRequest(
            action=content_pb2.WRITE, ref=ref, total=1000, offset=0, data=b"x" * 400
        )
    )
    assert (await call.read()).offset == 400
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass
    statuses = {s.ref: s for s in await client.list_statuses()}
    assert statuses[ref].offset == 400 and statuses[ref].total == 1000
    assert statuses[ref].started_at is not None
    assert [s.ref for s in await client.list_statuses([f'ref=="{ref}"'])] == [ref]
    await client.abort(ref)
    assert ref not in {s.ref for s in await client.list_statuses()}


async def test_images_and_walk(
    node: ContainerdNode, client: ContainerdClient, registry: Upstream
) -> None:
    for key in ("multi", "docker", "oci"):
        await pull(node, registry.ref(key))
    names = {img.name for img in await client.list_images()}
    assert set(registry.refs.values()) <= names
    # CRI's bare config-digest records exist, but are not names.
    assert any("/" not in n for n in node.images(include_ids=True))
    assert all("/" in n for n in names)
    assert await client.get_image("127.0.0.1:1/none/such:v1") is None

    multi = registry.images["multi"]
    assert isinstance(multi, images.Index)
    image = await client.get_image(registry.ref("multi"))
    assert image is not None
    assert image.target.digest == multi.digest and image.target.media_type == OCI_INDEX
    node_image = await client.walk_image(image)
    mine = multi.for_platform()
    assert node_image.digests == {multi.digest, *mine.blobs}
    assert node_image.complete
    for blob in node_image.blobs:
        assert blob.size == multi.blobs[blob.digest].size
        assert blob.media_type == multi.blobs[blob.digest].media_type
    assert node_image.get(mine.digest).platform == f"linux/{images.host_arch()}"  # type: ignore[union-attr]
    other = next(m for m in multi.manifests if m is not mine)
    assert other.digest not in node_image.digests

    # The same walk with the committed digests listed once up front.
    present = {i.digest for i in await client.list_content()}
    assert await client.walk_image(image, present) == node_image

    docker = registry.images["docker"]
    image = await client.get_image(registry.ref("docker"))
    assert image is not None
    node_image = await client.walk_image(image)
    assert node_image.digests == set(docker.blobs)
    assert node_image.blobs[0].media_type == DOCKER_MANIFEST
    assert {b.kind for b in node_image.blobs} == {"manifest", "config", "layer"}

    oci = registry.images["oci"]
    image = await client.get_image(registry.ref("oci"))
    assert image is not None
    node_image = await client.walk_image(image)
    assert node_image.blobs[0].media_type == OCI_MANIFEST
    assert node_image.digests == set(oci.blobs)


async def test_events_are_scoped_to_the_namespace(
    node: ContainerdNode, client: ContainerdClient, registry: Upstream
) -> None:
    received: list[Event] = []

    async def follow() -> None:
        async for event in client.subscribe():
            received.append(event)

    task = asyncio.create_task(follow())
    other = ContainerdClient(str(node.socket), namespace="other")
    await other.connect()
    try:
        await asyncio.sleep(0.3)  # let the subscription reach containerd
        ref = registry.ref("oci")
        await pull(node, ref)
        await eventually(
            lambda: any(e.topic == "/images/create" and e.image == ref for e in received),
            what="/images/create",
        )
        create = next(e for e in received if e.image == ref)
        assert create.type_name == "containerd.services.images.v1.ImageCreate"
        assert create.namespace == "k8s.io"

        # Leased, so that GC (set off by the first delete) cannot remove them first: only
        # explicit deletes publish /content/delete.
        other_lease = await other.create_lease(expire=timedelta(minutes=5))
        elsewhere = await other.write_blob(b"elsewhere", lease=other_lease.id)
        await asyncio.to_thread(node.ctr, "-n", "other", "content", "rm", elsewhere)
        lease = await client.create_lease(expire=timedelta(minutes=5))
        here = await client.write_blob(b"here", lease=lease.id)
        await asyncio.to_thread(node.ctr, "content", "rm", here)

        def of(digest: str, topic: str) -> list[Event]:
            return [e for e in received if e.digest == digest and e.topic == topic]

        await eventually(lambda: bool(of(here, "/content/delete")), what="/content/delete")
        assert not any(e.digest == elsewhere for e in received)
        assert of(here, "/content/delete")[0].type_name == "containerd.events.ContentDelete"
        # 2.1+ also report the commit (before the delete: events arrive in order).
        created = of(here, "/content/create")
        if node.runtime.content_events:
            assert [e.type_name for e in created] == ["containerd.events.ContentCreate"]
            assert received.index(created[0]) < received.index(of(here, "/content/delete")[0])
        else:
            assert created == []

        await asyncio.to_thread(node.ctr, "images", "rm", ref)
        await eventually(
            lambda: any(e.topic == "/images/delete" and e.image == ref for e in received),
            what="/images/delete",
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await other.close()


async def test_watch_resyncs_after_containerd_restart(
    node: ContainerdNode, client: ContainerdClient
) -> None:
    resyncs: list[int] = []
    events: list[Event] = []
    breaks: list[Exception] = []

    async def on_resync() -> None:
        # A resync re-reads everything; here it only proves containerd answers again.
        resyncs.append(len(await client.list_images()))

    async def on_event(event: Event) -> None:
        events.append(event)

    task = asyncio.create_task(watch(client, on_event, on_resync, on_break=breaks.append))
    try:
        await eventually(lambda: len(resyncs) == 1, what="first resync")
        await asyncio.to_thread(node.restart)
        await eventually(lambda: len(resyncs) >= 2, limit=30, what="resync after restart")
        assert breaks, "the restart must have broken the stream"
        lease = await client.create_lease(expire=timedelta(minutes=5))
        digest = await client.write_blob(b"after restart", lease=lease.id)
        await asyncio.to_thread(node.ctr, "content", "rm", digest)
        await eventually(lambda: any(e.digest == digest for e in events), what="event")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
