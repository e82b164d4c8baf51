"""Writing to containerd: content (Write, label updates, Abort, ingest statuses), image records
and leases.

The daemon's serving path only reads; these calls put images into a node's store: `shoal load`,
preheating, and the e2e tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import field_mask_pb2

from shoal.containerd.api import content_pb2, images_pb2, leases_pb2, types_pb2
from shoal.containerd.client import ContainerdClient
from shoal.containerd.model import (
    ContainerdError,
    ContainerdNotFound,
    Image,
    IngestStatus,
    Lease,
    rpc_error,
)
from shoal.oci.manifest import RawDescriptor

WRITE_CHUNK = 1024 * 1024
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"


class IngestClient(ContainerdClient):
    """The daemon's client plus containerd's write side."""

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

        async def chunks() -> AsyncIterator[bytes]:
            for pos in range(0, len(data), WRITE_CHUNK):
                yield data[pos : pos + WRITE_CHUNK]

        return await self.write_stream(
            chunks(), len(data), digest, ref=ref or f"shoal-{digest}", labels=labels, lease=lease
        )

    async def write_stream(
        self,
        chunks: AsyncIterator[bytes],
        total: int,
        expected: str | Callable[[], str],
        *,
        ref: str,
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> str:
        """Streams `total` bytes into the content store under ingest `ref` and commits them as
        `expected`, which may be a callable asked only once every chunk was sent (the caller
        hashes as it reads, or checks the digest it expects: raising there aborts the write
        before anything is committed). containerd verifies the digest again on commit.

        Returns the committed digest; content already present counts as committed. On any
        failure the unfinished ingest is aborted.
        """
        metadata = self._metadata + ((("containerd-lease", lease),) if lease else ())
        call = self._api.content.Write(metadata=metadata)
        known = expected if isinstance(expected, str) else ""
        pos = 0
        committed = False
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                if pos + len(chunk) > total:
                    raise ContainerdError(f"write {ref}: more than the {total} bytes announced")
                await call.write(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, ref=ref, total=total, expected=known,
                        offset=pos, data=chunk,
                    )
                )  # fmt: skip
                if await call.read() is grpc.aio.EOF:
                    raise ContainerdError(f"write {ref}: stream closed at {pos} bytes")
                pos += len(chunk)
            if pos != total:
                raise ContainerdError(f"write {ref}: {pos} of {total} bytes")
            digest = expected if isinstance(expected, str) else expected()
            await call.write(
                content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT, ref=ref, total=total, expected=digest,
                    offset=pos, labels=dict(labels or {}),
                )
            )  # fmt: skip
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise ContainerdError(f"write {ref}: stream closed before the commit answer")
            committed = True
            await call.done_writing()
            # containerd sends the commit response twice; drain to end the call cleanly.
            while await call.read() is not grpc.aio.EOF:
                pass
            return resp.digest or digest
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.ALREADY_EXISTS:
                committed = True
                return expected if isinstance(expected, str) else expected()
            raise rpc_error(err, f"write {ref}") from err
        finally:
            call.cancel()
            if not committed:
                with contextlib.suppress(ContainerdError):
                    await self.abort(ref)

    async def update_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Sets `labels` on committed content, leaving its other labels as they are."""
        await self._unary(
            f"update labels of {digest}",
            self._api.content.Update,
            content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=digest, labels=dict(labels)),
                update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
            ),
        )

    async def create_image(
        self, name: str, target: RawDescriptor, labels: Mapping[str, str] | None = None
    ) -> Image:
        resp = await self._unary(
            f"create image {name}",
            self._api.images.Create,
            images_pb2.CreateImageRequest(image=_image(name, target, labels or {})),
        )
        return Image.from_proto(resp.image)

    async def update_image(
        self, name: str, target: RawDescriptor, labels: Mapping[str, str] | None = None
    ) -> Image:
        """Points an existing image at `target` and sets `labels` (others are kept)."""
        labels = dict(labels or {})
        resp = await self._unary(
            f"update image {name}",
            self._api.images.Update,
            images_pb2.UpdateImageRequest(
                image=_image(name, target, labels),
                update_mask=field_mask_pb2.FieldMask(
                    paths=["target", *(f"labels.{k}" for k in labels)]
                ),
            ),
        )
        return Image.from_proto(resp.image)

    async def delete_image(self, name: str, *, sync: bool = False) -> None:
        """Deletes an image record; a missing one is not an error."""
        try:
            await self._unary(
                f"delete image {name}",
                self._api.images.Delete,
                images_pb2.DeleteImageRequest(name=name, sync=sync),
            )
        except ContainerdNotFound:
            pass

    async def abort(self, ref: str) -> None:
        """Drops an unfinished write."""
        await self._unary("abort", self._api.content.Abort, content_pb2.AbortRequest(ref=ref))

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[IngestStatus]:
        """Writes in progress (pulls downloading), e.g. filter `ref~="^layer-"`."""
        resp = await self._unary(
            "list statuses",
            self._api.content.ListStatuses,
            content_pb2.ListStatusesRequest(filters=list(filters)),
        )
        return [IngestStatus.from_proto(s) for s in resp.statuses]

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

    async def add_lease_resource(self, lease_id: str, digest: str) -> None:
        """Puts committed content under a lease (kept from GC while the lease lives)."""
        await self._unary(
            "add lease resource",
            self._api.leases.AddResource,
            leases_pb2.AddResourceRequest(
                id=lease_id, resource=leases_pb2.Resource(id=digest, type="content")
            ),
        )

    async def list_leases(self, filters: Sequence[str] = ()) -> list[Lease]:
        resp = await self._unary(
            "list leases", self._api.leases.List, leases_pb2.ListRequest(filters=list(filters))
        )
        return [Lease.from_proto(lease) for lease in resp.leases]


def _image(name: str, target: RawDescriptor, labels: Mapping[str, str]) -> images_pb2.Image:
    return images_pb2.Image(
        name=name,
        labels=dict(labels),
        target=types_pb2.Descriptor(
            media_type=target.media_type, digest=target.digest, size=target.size
        ),
    )
