"""One gRPC channel to containerd, scoped to one namespace, and where its content lives on disk.

Every namespaced call carries the `containerd-namespace` metadata (k8s.io, CRI's namespace, by
default). The calls themselves are grouped by containerd service (`content`, `images`, `events`,
`ingest`); `shoal.containerd.client.ContainerdClient` is what the daemon uses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Self

import grpc
from google.protobuf import empty_pb2

from shoal.containerd.api import (
    content_pb2_grpc,
    events_pb2_grpc,
    images_pb2_grpc,
    introspection_pb2,
    introspection_pb2_grpc,
    leases_pb2_grpc,
    version_pb2_grpc,
)
from shoal.containerd.model import ContainerdError, ContainerdUnavailable, rpc_error
from shoal.oci.digest import Digest

log = logging.getLogger("shoal.containerd")

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"
CONTENT_PLUGIN_TYPE = "io.containerd.content.v1"
CONTENT_PLUGIN_ID = "content"
# Images.List is one unary message holding every image record of the namespace.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024


def quote_filter(value: str) -> str:
    """A value quoted for containerd's filter syntax (`field=="value"`)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def socket_target(socket: str) -> str:
    """The gRPC target for a socket path; `unix:` targets are passed through."""
    if socket.startswith("unix:"):
        return socket
    return "unix://" + os.path.abspath(socket)


def parse_digest(digest: str | Digest) -> Digest:
    # Validates before a digest becomes part of a file path or a request.
    return digest if isinstance(digest, Digest) else Digest.parse(digest)


@dataclass(frozen=True)
class Stubs:
    content: content_pb2_grpc.ContentStub
    images: images_pb2_grpc.ImagesStub
    events: events_pb2_grpc.EventsStub
    leases: leases_pb2_grpc.LeasesStub
    version: version_pb2_grpc.VersionStub
    introspection: introspection_pb2_grpc.IntrospectionStub


class Connection:
    """Use `async with` or `connect()`/`close()`. `content_root` overrides the directory
    Introspection reports (e.g. when containerd's root is mounted elsewhere in a pod)."""

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
        self._stubs: Stubs | None = None
        self._metadata: tuple[tuple[str, str], ...] = (("containerd-namespace", namespace),)

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
            self._stubs = Stubs(
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

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _api(self) -> Stubs:
        if self._stubs is None:
            raise ContainerdUnavailable("containerd client is not connected")
        return self._stubs

    async def _unary(self, what: str, method: Any, request: Any, metadata: Any = None) -> Any:
        """One unary call; gRPC errors become ContainerdError subclasses naming `what`."""
        try:
            return await method(request, metadata=metadata or self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, what) from err

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
        d = parse_digest(digest)
        return os.path.join(self._root, "blobs", d.algorithm, d.hex)
