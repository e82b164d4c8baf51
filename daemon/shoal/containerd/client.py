"""Async client for the part of containerd's gRPC API shoal uses (containerd 1.6 and later).

Every namespaced call carries the `containerd-namespace` metadata (k8s.io, CRI's namespace, by
default). Blob bytes are read straight from containerd's content directory when this process can
read it (much faster than gRPC Read, which streams small chunks), else through gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import DecodeError

from shoal.containerd.api import (
    content_events_pb2,
    content_pb2,
    content_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    introspection_pb2,
    introspection_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    version_pb2_grpc,
)
from shoal.containerd.model import (
    ContainerdError,
    ContainerdNotFound,
    ContainerdUnavailable,
    ContentInfo,
    Event,
    Image,
    IngestStatus,
    Lease,
    rpc_error,
)
from shoal.containerd.walk import NodeImage, walk
from shoal.oci.digest import Digest
from shoal.oci.mediatypes import MAX_MANIFEST_BYTES

log = logging.getLogger("shoal.containerd")

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"
CONTENT_PLUGIN_TYPE = "io.containerd.content.v1"
CONTENT_PLUGIN_ID = "content"
# Images.List is one unary message holding every image record of the namespace.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
DISK_CHUNK = 256 * 1024
WRITE_CHUNK = 1024 * 1024
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
# Topics that change what a node can serve. /content/create (a blob committed) exists from
# containerd 2.1; older versions simply never match it.
CONTENT_CREATE = "/content/create"
DEFAULT_EVENT_FILTERS = (
    'topic~="^/images/"',
    'topic=="/content/delete"',
    'topic=="/content/create"',
)

_EVENT_TYPES: dict[str, Any] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        images_pb2.ImageCreate,
        images_pb2.ImageUpdate,
        images_pb2.ImageDelete,
        content_events_pb2.ContentCreate,
        content_events_pb2.ContentDelete,
    )
}


def quote_filter(value: str) -> str:
    """A value quoted for containerd's filter syntax (`field=="value"`)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def socket_target(socket: str) -> str:
    """The gRPC target for a socket path; `unix:` targets are passed through."""
    if socket.startswith("unix:"):
        return socket
    return "unix://" + os.path.abspath(socket)


def decode_event(envelope: events_pb2.Envelope) -> Event:
    """An Event from an Envelope. The Any's type_url is a bare proto name (no `/`), which
    Any.Unpack rejects, so the payload type is matched by name here."""
    type_url = envelope.event.type_url
    type_name = type_url.rsplit("/", 1)[-1]
    timestamp = (
        envelope.timestamp.ToDatetime(tzinfo=UTC) if envelope.HasField("timestamp") else None
    )
    fields: dict[str, Any] = {}
    cls = _EVENT_TYPES.get(type_name)
    try:
        msg = cls.FromString(envelope.event.value) if cls is not None else None
    except DecodeError:
        msg = None  # left undecoded rather than breaking the stream
    if msg is not None:
        if isinstance(msg, content_events_pb2.ContentCreate | content_events_pb2.ContentDelete):
            fields["digest"] = msg.digest
        else:
            fields["image"] = msg.name
            if not isinstance(msg, images_pb2.ImageDelete):
                fields["labels"] = dict(msg.labels)
    return Event(
        topic=envelope.topic,
        namespace=envelope.namespace,
        type_name=type_name,
        timestamp=timestamp,
        payload=envelope.event.value,
        **fields,
    )


@dataclass(frozen=True)
class _Stubs:
    content: content_pb2_grpc.ContentStub
    images: images_pb2_grpc.ImagesStub
    events: events_pb2_grpc.EventsStub
    leases: leases_pb2_grpc.LeasesStub
    version: version_pb2_grpc.VersionStub
    introspection: introspection_pb2_grpc.IntrospectionStub


def _digest(digest: str | Digest) -> Digest:
    # Validates before a digest becomes part of a file path or a request.
    return digest if isinstance(digest, Digest) else Digest.parse(digest)


class ContainerdClient:
    """One gRPC channel to containerd, scoped to one namespace.

    Use `async with ContainerdClient(...)` or `connect()`/`close()`. `content_root` overrides the
    directory Introspection reports (e.g. when containerd's root is mounted elsewhere in a pod).
    """

    def __init__(
        self,
        socket: str = DEFAULT_SOCKET,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        content_root: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.socket = socket
        self.namespace = namespace
        self.timeout = timeout
        self._root_override = content_root or None
        self._root: str | None = None
        self._root_known = False
        self._disk_ok = False
        self._channel: grpc.aio.Channel | None = None
        self._stubs: _Stubs | None = None
        self._metadata: tuple[tuple[str, str], ...] = (("containerd-namespace", namespace),)

    # -- connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Opens the channel, checks containerd answers, and finds the content directory.

        Raises ContainerdUnavailable when containerd cannot be reached.
        """
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                socket_target(self.socket),
                options=[
                    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                    ("grpc.max_send_message_length", 16 * 1024 * 1024),
                    # Reconnect quickly after a containerd restart (gRPC's default backs off
                    # up to two minutes).
                    ("grpc.max_reconnect_backoff_ms", 5000),
                    ("grpc.initial_reconnect_backoff_ms", 200),
                ],
            )
            ch = self._channel
            self._stubs = _Stubs(
                content=content_pb2_grpc.ContentStub(ch),
                images=images_pb2_grpc.ImagesStub(ch),
                events=events_pb2_grpc.EventsStub(ch),
                leases=leases_pb2_grpc.LeasesStub(ch),
                version=version_pb2_grpc.VersionStub(ch),
                introspection=introspection_pb2_grpc.IntrospectionStub(ch),
            )
        await self.version()
        await self.content_root()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stubs = self._channel, None, None
            await channel.close()

    async def __aenter__(self) -> ContainerdClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _api(self) -> _Stubs:
        if self._stubs is None:
            raise ContainerdUnavailable("containerd client is not connected")
        return self._stubs

    async def _unary(self, what: str, method: Any, request: Any, metadata: Any = None) -> Any:
        try:
            return await method(request, metadata=metadata or self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, what) from err

    # -- server -----------------------------------------------------------------------------

    async def version(self) -> str:
        """containerd's version string, e.g. `1.6.20~ds1`."""
        resp = await self._unary("version", self._api.version.Version, empty_pb2.Empty())
        return resp.version

    async def content_root(self) -> str | None:
        """The content store's directory (`<root>/blobs/<alg>/<hex>`), or None if unknown.

        Asked once from Introspection (the content plugin exports `root`) unless overridden.
        """
        if not self._root_known:
            root = self._root_override
            if root is None:
                try:
                    resp = await self._unary(
                        "introspection",
                        self._api.introspection.Plugins,
                        introspection_pb2.PluginsRequest(
                            filters=[
                                f"type=={quote_filter(CONTENT_PLUGIN_TYPE)},"
                                f"id=={quote_filter(CONTENT_PLUGIN_ID)}"
                            ]
                        ),
                    )
                except ContainerdUnavailable:
                    raise
                except ContainerdError:
                    resp = None  # an older or locked-down containerd: fall back to gRPC Read
                for plugin in resp.plugins if resp else ():
                    if plugin.type == CONTENT_PLUGIN_TYPE and plugin.id == CONTENT_PLUGIN_ID:
                        root = plugin.exports.get("root") or None
            self._root = root
            self._root_known = True
        return self._root

    def _disk_readable(self) -> bool:
        """Whether blob files can be read from the content directory.

        Never remembered as "no": containerd 1.7 and 2.1 create the directory only at their
        first write, which may come long after shoal connected. Until it is readable, every
        use asks again; one access() costs far less than the gRPC call it may save. `blobs/`
        itself appears only with the first blob, so the root is checked.
        """
        if not self._disk_ok and self._root is not None:
            self._disk_ok = os.access(self._root, os.R_OK | os.X_OK)
            if self._disk_ok:
                log.info("content directory %s is readable: blobs are read from disk", self._root)
        return self._disk_ok

    def blob_path(self, digest: str | Digest) -> str | None:
        """Where the blob's file is, when the content directory is known and readable.

        The file exists only if the blob is committed; it never changes once there.
        """
        if self._root is None or not self._disk_readable():
            return None
        d = _digest(digest)
        return os.path.join(self._root, "blobs", d.algorithm, d.hex)

    # -- images -----------------------------------------------------------------------------

    async def list_images(self) -> list[Image]:
        """Every named image of the namespace.

        CRI also records each image under its bare config digest (`sha256:…`); those records
        are no names a registry client asks for, so only names with a `/` are returned.
        """
        resp = await self._unary(
            "list images",
            self._api.images.List,
            images_pb2.ListImagesRequest(filters=['name~="^.+/"']),
        )
        return [Image.from_proto(img) for img in resp.images if "/" in img.name]

    async def get_image(self, name: str) -> Image | None:
        try:
            resp = await self._unary(
                f"get image {name}",
                self._api.images.Get,
                images_pb2.GetImageRequest(name=name),
            )
        except ContainerdNotFound:
            return None
        return Image.from_proto(resp.image)

    async def walk_image(self, image: Image, present: Collection[str] | None = None) -> NodeImage:
        """Every blob of `image` this node holds (see shoal.containerd.walk).

        `present` is the set of committed digests; pass one from `list_content()` when walking
        many images, else each blob is checked with Info.
        """
        if present is None:

            async def has(digest: str) -> bool:
                return await self.info(digest) is not None

        else:

            async def has(digest: str) -> bool:
                return digest in present

        return await walk(image.name, image.target, self.read_blob, has)

    # -- content ----------------------------------------------------------------------------

    async def info(self, digest: str | Digest) -> ContentInfo | None:
        """The committed blob's info, or None if the store does not have it."""
        d = str(_digest(digest))
        try:
            resp = await self._unary(
                f"info {d}", self._api.content.Info, content_pb2.InfoRequest(digest=d)
            )
        except ContainerdNotFound:
            return None
        return ContentInfo.from_proto(resp.info)

    async def list_content(self, filters: Sequence[str] = ()) -> list[ContentInfo]:
        """Every committed blob (optionally filtered, e.g. `labels."containerd.io/…"`)."""
        call = self._api.content.List(
            content_pb2.ListContentRequest(filters=list(filters)), metadata=self._metadata
        )
        out: list[ContentInfo] = []
        try:
            async for resp in call:
                out.extend(ContentInfo.from_proto(info) for info in resp.info)
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, "list content") from err
        return out

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[IngestStatus]:
        """Writes in progress (pulls downloading), e.g. filter `ref~="^layer-"`."""
        resp = await self._unary(
            "list statuses",
            self._api.content.ListStatuses,
            content_pb2.ListStatusesRequest(filters=list(filters)),
        )
        return [IngestStatus.from_proto(s) for s in resp.statuses]

    async def read(
        self, digest: str | Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) of a committed blob through gRPC Read.

        Raises ContainerdNotFound if the blob is not committed, ContainerdError (OUT_OF_RANGE)
        when offset is past its end.
        """
        if length is not None and length <= 0:
            return
        d = str(_digest(digest))
        call = self._api.content.Read(
            content_pb2.ReadContentRequest(digest=d, offset=offset, size=length or 0),
            metadata=self._metadata,
        )
        received = 0
        try:
            async for resp in call:
                # containerd counts from the requested offset; accept absolute offsets too,
                # in case a later version changes that.
                if resp.offset not in (received, offset + received):
                    raise ContainerdError(
                        f"containerd read {d}: chunk at {resp.offset}, expected {received}"
                    )
                received += len(resp.data)
                if resp.data:
                    yield resp.data
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, f"read {d}") from err
        finally:
            call.cancel()

    async def open_blob(
        self, digest: str | Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) of a committed blob, from disk when possible.

        Reads the file in DISK_CHUNK pieces off the event loop; falls back to gRPC Read when the
        content directory is unknown or unreadable, or the file is not there.
        """
        if length is not None and length <= 0:
            return
        d = _digest(digest)
        path = self.blob_path(d)
        fd = -1
        if path is not None:
            try:
                fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1
        if fd < 0:
            async for chunk in self.read(d, offset, length):
                yield chunk
            return
        try:
            size = os.fstat(fd).st_size
            if offset > size:
                raise ContainerdError(
                    f"read {d}: offset {offset} past its end ({size} bytes)",
                    grpc.StatusCode.OUT_OF_RANGE,
                )
            end = size if length is None else min(size, offset + length)
            pos = offset
            while pos < end:
                data = await asyncio.to_thread(os.pread, fd, min(DISK_CHUNK, end - pos), pos)
                if not data:
                    raise ContainerdError(f"read {d}: file ended at {pos} of {end} bytes")
                pos += len(data)
                yield data
        finally:
            os.close(fd)

    async def read_blob(self, digest: str | Digest, max_size: int = MAX_MANIFEST_BYTES) -> bytes:
        """A whole (small) blob in memory, e.g. a manifest; ValueError if over `max_size`."""
        chunks: list[bytes] = []
        total = 0
        async for chunk in self.open_blob(digest, 0, max_size + 1):
            total += len(chunk)
            if total > max_size:
                raise ValueError(f"blob {digest} is larger than {max_size} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def write_blob(
        self,
        data: bytes,
        *,
        expected: str | None = None,
        ref: str | None = None,
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> str:
        """Stores `data` through Content.Write and returns its digest.

        containerd verifies the digest on commit. Content that is already present is not written
        again. Without a `lease` (or an image referencing it) the blob is garbage collectable.
        """
        digest = expected or "sha256:" + hashlib.sha256(data).hexdigest()
        metadata = self._metadata + ((("containerd-lease", lease),) if lease else ())
        call = self._api.content.Write(metadata=metadata)
        ref = ref or f"shoal-{digest}"
        total = len(data)
        pos = 0
        try:
            while True:
                chunk = data[pos : pos + WRITE_CHUNK]
                last = pos + len(chunk) >= total
                request = content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT if last else content_pb2.WRITE,
                    ref=ref,
                    total=total,
                    expected=digest,
                    offset=pos,
                    data=chunk,
                    labels=dict(labels or {}) if last else None,
                )
                await call.write(request)
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise ContainerdError(f"write {digest}: stream closed at {pos} bytes")
                pos += len(chunk)
                if last:
                    break
            await call.done_writing()
            # containerd sends the commit response twice; drain to end the call cleanly.
            while await call.read() is not grpc.aio.EOF:
                pass
            return resp.digest or digest
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.ALREADY_EXISTS:
                return digest
            raise rpc_error(err, f"write {digest}") from err
        finally:
            call.cancel()

    async def abort(self, ref: str) -> None:
        """Drops an unfinished write."""
        await self._unary("abort", self._api.content.Abort, content_pb2.AbortRequest(ref=ref))

    # -- events -----------------------------------------------------------------------------

    def _subscription(self, filters: Sequence[str] | None) -> Any:
        # Subscribe is not scoped by the namespace metadata: scope each filter explicitly.
        scope = f"namespace=={quote_filter(self.namespace)}"
        wanted = DEFAULT_EVENT_FILTERS if filters is None else filters
        request = events_pb2.SubscribeRequest(
            filters=[f"{scope},{f}" if f else scope for f in wanted] or [scope]
        )
        return self._api.events.Subscribe(request, metadata=self._metadata)

    async def subscribe(self, filters: Sequence[str] | None = None) -> AsyncIterator[Event]:
        """Events of this namespace, as they happen (none are replayed).

        Default filters: image create/update/delete, content create (2.1+) and delete. Pass
        containerd filter expressions (OR-ed) to choose others; `[""]` means every topic.
        Raises ContainerdError when the stream breaks.
        """
        call = self._subscription(filters)
        async for event in self._events_of(call):
            yield event

    async def publish(
        self, topic: str, type_url: str = "google.protobuf.Empty", value: bytes = b""
    ) -> None:
        """Publishes an event in this namespace (topic: `/a/b`, identifier components)."""
        await self._unary(
            f"publish {topic}",
            self._api.events.Publish,
            events_pb2.PublishRequest(topic=topic, event=AnyProto(type_url=type_url, value=value)),
        )

    async def _events_of(self, call: Any) -> AsyncGenerator[Event, None]:
        try:
            async for envelope in call:
                yield decode_event(envelope)
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, "subscribe") from err
        finally:
            call.cancel()

    # -- leases -----------------------------------------------------------------------------

    async def create_lease(
        self,
        lease_id: str | None = None,
        *,
        expire: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Lease:
        """A lease protecting what is written under it from GC until deleted or expired."""
        all_labels = dict(labels or {})
        if expire is not None:
            until = datetime.now(UTC) + expire
            all_labels[LEASE_EXPIRE_LABEL] = until.strftime("%Y-%m-%dT%H:%M:%SZ")
        lease_id = lease_id or f"shoal-{os.urandom(8).hex()}"
        resp = await self._unary(
            "create lease",
            self._api.leases.Create,
            leases_pb2.CreateRequest(id=lease_id, labels=all_labels),
        )
        return Lease.from_proto(resp.lease)

    async def delete_lease(self, lease_id: str, *, sync: bool = False) -> None:
        """Deletes a lease; a missing lease is not an error. `sync` waits for the GC."""
        try:
            await self._unary(
                "delete lease",
                self._api.leases.Delete,
                leases_pb2.DeleteRequest(id=lease_id, sync=sync),
            )
        except ContainerdNotFound:
            pass

    async def list_leases(self, filters: Sequence[str] = ()) -> list[Lease]:
        resp = await self._unary(
            "list leases", self._api.leases.List, leases_pb2.ListRequest(filters=list(filters))
        )
        return [Lease.from_proto(lease) for lease in resp.leases]
