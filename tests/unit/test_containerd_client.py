"""containerd client logic that needs no daemon: events, filters, disk reads, the watcher."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyProto

from shoal.containerd import (
    Backoff,
    ContainerdClient,
    ContainerdError,
    ContainerdUnavailable,
    Event,
    decode_event,
    quote_filter,
    watch,
)
from shoal.containerd.api import content_events_pb2, events_pb2, images_pb2
from shoal.containerd.connection import socket_target
from shoal.containerd.content import DISK_CHUNK
from shoal.oci.errors import DigestInvalid


def envelope(type_url: str, payload: Any, topic: str) -> events_pb2.Envelope:
    env = events_pb2.Envelope(
        namespace="k8s.io",
        topic=topic,
        event=AnyProto(type_url=type_url, value=payload.SerializeToString()),
    )
    env.timestamp.FromSeconds(1700000000)
    return env


def test_decode_image_events() -> None:
    create = decode_event(
        envelope(
            "containerd.services.images.v1.ImageCreate",
            images_pb2.ImageCreate(name="docker.io/library/a:1", labels={"k": "v"}),
            "/images/create",
        )
    )
    assert create.topic == "/images/create"
    assert create.namespace == "k8s.io"
    assert create.type_name == "containerd.services.images.v1.ImageCreate"
    assert create.image == "docker.io/library/a:1"
    assert create.labels == {"k": "v"}
    assert create.digest is None
    assert create.timestamp is not None and create.timestamp.timestamp() == 1700000000

    delete = decode_event(
        envelope(
            "containerd.services.images.v1.ImageDelete",
            images_pb2.ImageDelete(name="x/y:1"),
            "/images/delete",
        )
    )
    assert (delete.image, delete.labels) == ("x/y:1", {})


def test_decode_content_delete_and_prefixed_type_url() -> None:
    digest = "sha256:" + "a" * 64
    event = decode_event(
        envelope(
            "types.example/containerd.events.ContentDelete",
            content_events_pb2.ContentDelete(digest=digest),
            "/content/delete",
        )
    )
    assert event.type_name == "containerd.events.ContentDelete"
    assert event.digest == digest and event.image is None


def test_decode_content_create() -> None:
    digest = "sha256:" + "c" * 64
    event = decode_event(
        envelope(
            "containerd.events.ContentCreate",
            content_events_pb2.ContentCreate(digest=digest, size=1234),
            "/content/create",
        )
    )
    assert (event.topic, event.digest, event.image) == ("/content/create", digest, None)


def test_decode_unknown_event_keeps_payload() -> None:
    payload = images_pb2.ImageDelete(name="ignored")
    event = decode_event(envelope("containerd.events.TaskExit", payload, "/tasks/exit"))
    assert event.type_name == "containerd.events.TaskExit"
    assert event.image is None and event.digest is None
    assert event.payload == payload.SerializeToString()


def test_decode_garbled_payload_is_left_undecoded() -> None:
    env = events_pb2.Envelope(
        topic="/images/create",
        event=AnyProto(type_url="containerd.services.images.v1.ImageCreate", value=b"\xff\xff"),
    )
    event = decode_event(env)
    assert event.image is None and event.payload == b"\xff\xff" and event.timestamp is None


def test_filters_and_targets() -> None:
    assert quote_filter("k8s.io") == '"k8s.io"'
    assert quote_filter('a"b\\c') == '"a\\"b\\\\c"'
    assert (
        socket_target("/run/containerd/containerd.sock") == "unix:///run/containerd/containerd.sock"
    )
    assert socket_target("unix:///x.sock") == "unix:///x.sock"
    assert socket_target("rel.sock") == "unix://" + os.path.abspath("rel.sock")


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, str, bytes]:
    data = os.urandom(3 * DISK_CHUNK + 123)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / digest.split(":")[1]).write_bytes(data)
    return tmp_path, digest, data


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in it]


async def test_open_blob_reads_from_disk_in_chunks(store: tuple[Path, str, bytes]) -> None:
    root, digest, data = store
    # Never connected: any gRPC fallback would raise ContainerdUnavailable.
    client = ContainerdClient("/nonexistent.sock", content_root=str(root))
    assert await client.content_root() == str(root)
    assert client.blob_path(digest) == str(root / "blobs" / "sha256" / digest[7:])
    chunks = await collect(client.open_blob(digest))
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) == DISK_CHUNK
    assert b"".join(await collect(client.open_blob(digest, 10, 100))) == data[10:110]
    assert (
        b"".join(await collect(client.open_blob(digest, DISK_CHUNK - 1))) == data[DISK_CHUNK - 1 :]
    )
    assert b"".join(await collect(client.open_blob(digest, 5, 10**9))) == data[5:]
    assert await collect(client.open_blob(digest, len(data))) == []
    assert await collect(client.open_blob(digest, 0, 0)) == []
    assert await client.read_blob(digest, len(data)) == data
    with pytest.raises(ValueError):
        await client.read_blob(digest, len(data) - 1)
    with pytest.raises(ContainerdError):
        await collect(client.open_blob(digest, len(data) + 1))


async def test_open_blob_falls_back_to_grpc(store: tuple[Path, str, bytes]) -> None:
    root, _, _ = store
    client = ContainerdClient("/nonexistent.sock", content_root=str(root))
    await client.content_root()
    with pytest.raises(ContainerdUnavailable):
        await collect(client.open_blob("sha256:" + "b" * 64))
    unreadable = ContainerdClient("/nonexistent.sock", content_root=str(root / "missing"))
    await unreadable.content_root()
    assert unreadable.blob_path("sha256:" + "b" * 64) is None


async def test_content_directory_created_after_connect_is_read_from_disk(
    store: tuple[Path, str, bytes],
) -> None:
    """containerd 1.7+ creates the content directory at its first write: a client that found
    none at connect reads blobs from disk once it exists, without reconnecting."""
    built, digest, data = store
    root = built.parent / "later"
    client = ContainerdClient("/nonexistent.sock", content_root=str(root))
    assert await client.content_root() == str(root)
    assert client.blob_path(digest) is None  # not there yet: over gRPC
    built.rename(root)
    assert client.blob_path(digest) == str(root / "blobs" / "sha256" / digest[7:])
    assert b"".join(await collect(client.open_blob(digest))) == data  # never connected


async def test_digests_are_validated_before_touching_paths(
    store: tuple[Path, str, bytes],
) -> None:
    root, _, _ = store
    client = ContainerdClient("/nonexistent.sock", content_root=str(root))
    await client.content_root()
    for bad in ("sha256:../../../etc/passwd", "sha256:" + "A" * 64, "md5:abc", "sha256"):
        with pytest.raises(DigestInvalid):
            client.blob_path(bad)
        with pytest.raises(DigestInvalid):
            await collect(client.open_blob(bad))


def test_backoff_doubles_caps_and_resets() -> None:
    delays = Backoff(initial=1, maximum=5, jitter=0).delays()
    assert [delays(False) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert delays(True) == 1
    assert delays(False) == 2


class FakeCall:
    def __init__(self, filters: list[str], down: bool, events: list[Event]) -> None:
        self.filters = filters
        self.down = down
        self.events = events
        self.probe: str | None = None
        self.publishes = 0
        self.probed = asyncio.Event()
        self.closed = False

    def cancel(self) -> None:
        self.closed = True


class FakeClient:
    """Plays a script of subscriptions: (containerd down?, events before the stream breaks).

    Like containerd, it echoes a published probe event on the stream; the last subscription
    stays open.
    """

    def __init__(self, script: list[tuple[bool, list[Event]]]) -> None:
        self.script = script
        self.calls: list[FakeCall] = []

    def subscription(self, filters: list[str]) -> FakeCall:
        down, events = self.script.pop(0) if self.script else (False, [])
        self.calls.append(FakeCall(filters, down, events))
        return self.calls[-1]

    async def publish(self, topic: str) -> None:
        call = self.calls[-1]
        if call.down:
            raise ContainerdUnavailable("down")
        call.publishes += 1
        if call.publishes > 1:  # the first one raced the subscription and was lost
            call.probe = topic
            call.probed.set()

    async def events_of(self, call: FakeCall) -> AsyncIterator[Event]:
        # An event from before the subscription was confirmed: the resync covers it.
        yield ev("early")
        if call.down:
            raise ContainerdUnavailable("down")
        await call.probed.wait()  # published by the watcher's prober task
        yield Event(topic=call.probe or "", namespace="k8s.io", type_name="x")
        for event in call.events:
            yield event
        if not self.script:
            await asyncio.Event().wait()
        raise ContainerdError("stream broke")


def ev(name: str) -> Event:
    return Event(topic="/images/create", namespace="k8s.io", type_name="x", image=name)


async def test_watch_resubscribes_and_resyncs_after_every_break() -> None:
    client = FakeClient(
        [
            (False, [ev("a"), ev("b")]),  # breaks after two events
            (True, []),  # containerd down: no resync
            (False, [ev("c")]),
            (False, [ev("d")]),  # stays open
        ]
    )
    log: list[str] = []
    breaks: list[Exception] = []
    done = asyncio.Event()

    async def on_event(event: Event) -> None:
        log.append(f"event {event.image}")
        assert event.image != "early"
        if event.image == "c":
            raise RuntimeError("handler failed")  # counts as a break too
        if event.image == "d":
            done.set()

    async def on_resync() -> None:
        log.append("resync")

    task = asyncio.create_task(
        watch(
            client,
            on_event,
            on_resync,
            filters=['topic=="/images/create"'],
            backoff=Backoff(initial=0.001, maximum=0.01),
            on_break=breaks.append,
        )
    )
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == [
        "resync",
        "event a",
        "event b",
        "resync",
        "event c",
        "resync",
        "event d",
    ]
    assert [type(e) for e in breaks] == [ContainerdError, ContainerdUnavailable, RuntimeError]
    assert all(call.closed for call in client.calls)
    for call in client.calls:
        assert call.filters[0] == 'topic=="/images/create"'
        assert call.filters[1].startswith('topic=="/shoal/sync/')
    probes = {c.probe for c in client.calls if c.probe}
    assert len(probes) == 3  # a fresh probe topic per subscription
