"""Plain, typed values the containerd client returns, so callers never touch generated messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from shoal.containerd.api import content_pb2, images_pb2, leases_pb2, types_pb2
from shoal.oci.manifest import RawDescriptor


class ContainerdError(Exception):
    """A containerd call failed. `code` is the gRPC status code when containerd answered one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ContainerdNotFound(ContainerdError, LookupError):
    """The image, blob, ingest or lease does not exist (gRPC NOT_FOUND)."""


class ContainerdUnavailable(ContainerdError):
    """containerd cannot be reached (socket missing, daemon restarting, connection lost)."""


def rpc_error(err: grpc.aio.AioRpcError, what: str) -> ContainerdError:
    """The ContainerdError subclass for a failed call; `what` names the call in the message."""
    code = err.code()
    message = f"containerd {what}: {code.name}: {err.details()}"
    if code == grpc.StatusCode.NOT_FOUND:
        return ContainerdNotFound(message, code)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ContainerdUnavailable(message, code)
    return ContainerdError(message, code)


def _time(msg: Message, name: str) -> datetime | None:
    # Unset timestamps stay None rather than becoming 1970.
    if not msg.HasField(name):
        return None
    ts: Timestamp = getattr(msg, name)
    return ts.ToDatetime(tzinfo=UTC)


def descriptor_from_proto(msg: types_pb2.Descriptor) -> RawDescriptor:
    return RawDescriptor(msg.media_type, msg.digest, msg.size, dict(msg.annotations))


@dataclass(frozen=True)
class Image:
    """An image record: a name (`host/repo:tag` or `host/repo@sha256:…`) and its target."""

    name: str
    target: RawDescriptor
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: images_pb2.Image) -> Image:
        return cls(
            name=msg.name,
            target=descriptor_from_proto(msg.target),
            labels=dict(msg.labels),
            created_at=_time(msg, "created_at"),
            updated_at=_time(msg, "updated_at"),
        )


@dataclass(frozen=True)
class ContentInfo:
    """A committed blob in the content store."""

    digest: str
    size: int
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: content_pb2.Info) -> ContentInfo:
        return cls(
            digest=msg.digest,
            size=msg.size,
            labels=dict(msg.labels),
            created_at=_time(msg, "created_at"),
            updated_at=_time(msg, "updated_at"),
        )


@dataclass(frozen=True)
class IngestStatus:
    """A write in progress (a pull downloading a blob): `offset` of `total` bytes received.

    `ref` looks like `layer-sha256:…` or `manifest-sha256:…` for pulls; `expected` is the digest
    the ingest will have once committed (may be empty).
    """

    ref: str
    offset: int
    total: int
    expected: str
    started_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: content_pb2.Status) -> IngestStatus:
        return cls(
            ref=msg.ref,
            offset=msg.offset,
            total=msg.total,
            expected=msg.expected,
            started_at=_time(msg, "started_at"),
            updated_at=_time(msg, "updated_at"),
        )


@dataclass(frozen=True)
class Lease:
    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: leases_pb2.Lease) -> Lease:
        return cls(msg.id, dict(msg.labels), _time(msg, "created_at"))


@dataclass(frozen=True)
class Event:
    """One containerd event.

    `type_name` is the payload's proto name (e.g. `containerd.services.images.v1.ImageCreate`).
    `image` is set for image events, `digest` for `/content/create|delete`; `labels` for image
    create/update. Other payloads are left undecoded (`payload` holds their bytes).
    """

    topic: str
    namespace: str
    type_name: str
    timestamp: datetime | None = None
    image: str | None = None
    digest: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    payload: bytes = b""
