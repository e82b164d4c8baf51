"""Writing to containerd: content (Write, Abort, ingest statuses) and leases.

The daemon only reads; these calls are for putting images into a node's store, as the coming
`shoal load` command will (issue 16). Until then the e2e tests are their only users.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import grpc

from shoal.containerd.api import content_pb2, leases_pb2
from shoal.containerd.client import ContainerdClient
from shoal.containerd.model import (
    ContainerdError,
    ContainerdNotFound,
    IngestStatus,
    Lease,
    rpc_error,
)

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

    async def list_leases(self, filters: Sequence[str] = ()) -> list[Lease]:
        resp = await self._unary(
            "list leases", self._api.leases.List, leases_pb2.ListRequest(filters=list(filters))
        )
        return [Lease.from_proto(lease) for lease in resp.leases]
