"""A node's side of `shoal preheat`: fetch an image once, keep it in the node's containerd until
its kubelet pulls it, and answer its tag meanwhile.

The image is fetched through the node's own sources, as a pull of its containerd would be
(from this node's store, a peer, else upstream through the cluster's designated fetcher, in
manifest order), verified, and written into containerd's content store under a lease that
expires after the preheat's TTL. When the kubelet pulls, containerd finds every blob present
and fetches nothing. Until then the node advertises the image's digests and its tag, and
answers the tag itself (`PreheatedStore`): peers can resolve it from here while the registry is
down. Once an image record names the image (the kubelet pulled it), the lease is released: the
image keeps its content from then on.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from shoal import metrics
from shoal.containerd.ingest import IngestClient
from shoal.content.model import Blob, Descriptor, Source
from shoal.content.verify import verified_chunks
from shoal.oci.digest import Digest
from shoal.oci.manifest import children
from shoal.oci.mediatypes import (
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    manifest_media_type,
    parse_manifest,
)
from shoal.oci.names import Reference
from shoal.tenancy.access import HeldImage

log = logging.getLogger("shoal.preheat")

MAX_JOBS = 16  # images a node keeps for preheats at once
MAX_TTL = 24 * 3600.0
FORGET_AFTER = 600.0  # a finished job stays listed this long
STATES = ("fetching", "kept", "pulled", "failed", "expired")


class Sources(Protocol):
    """The node's sources, as its containerd's requests use them (shoal.sources.chain)."""

    @property
    def sources(self) -> list[Source]: ...


def host_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


@dataclass
class Job:
    ref: Reference  # with the tag asked for (or the digest)
    target: Descriptor  # what the tag named: an index or a manifest
    until: float
    state: str = "fetching"
    bytes_total: int = 0
    bytes_done: int = 0
    digests: set[str] = field(default_factory=set)
    error: str = ""
    lease: str = ""
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        name = (
            self.ref.image_name or f"{self.ref.registry}/{self.ref.repository}@{self.target.digest}"
        )
        return {
            "ref": name,
            "manifest": str(self.target.digest),
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "until": self.until,
            "error": self.error,
        }


class Keeper:
    def __init__(
        self,
        client: IngestClient,
        chain: Sources,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.chain = chain
        self.on_change = on_change
        self.clock = clock
        self.jobs: dict[Digest, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what others ask -------------------------------------------------------------------------

    def start(self, ref: Reference, target: Descriptor, ttl: float) -> Job:
        """Starts (or joins, extending its time) the preheat of `target`; ValueError when full."""
        until = self.clock() + max(1.0, min(ttl, MAX_TTL))
        job = self.jobs.get(target.digest)
        if job is not None and job.state in ("fetching", "kept"):
            job.until = max(job.until, until)  # the lease keeps its own expiry; a new one below
            if job.state == "kept":
                self._spawn(self._extend(job))
            return job
        active = sum(j.state in ("fetching", "kept") for j in self.jobs.values())
        if active >= MAX_JOBS:
            raise ValueError(f"this node already keeps {active} preheated images")
        job = self.jobs[target.digest] = Job(ref, target, until)
        self._spawn(self._run(job))
        self._count()
        return job

    def image_target(self, name: str) -> Descriptor | None:
        """What a kept image's tag names (tags of this node's preheats, before any pull)."""
        for job in self.jobs.values():
            if job.state == "kept" and job.ref.image_name == name and job.until > self.clock():
                return job.target
        return None

    def keys(self) -> set[str]:
        """Routing keys of what this node keeps: the digests, and the tags."""
        out: set[str] = set()
        for image in self.held():
            out |= image.digests | ({image.name} if image.tag else set())
        return out

    def held(self) -> list[HeldImage]:
        """What this node keeps, as images for the sharing rules: fetched for the cluster,
        anonymously, so shared (as `io.shoal.shareable=true` would say of an image record)."""
        out: list[HeldImage] = []
        for job in self.jobs.values():
            name = job.ref.image_name
            if job.state != "kept" or job.until <= self.clock() or not name:
                continue
            digests = frozenset(job.digests)
            # Any of them may be asked as a manifest, under this repository only.
            out.append(HeldImage(job.ref.registry or "", job.ref.repository, name,
                                 str(job.target.digest), digests, digests, job.ref.tag is not None,
                                 shared=True))  # fmt: skip
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [j.to_json() for j in self.jobs.values()]

    # -- fetching --------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        try:
            ttl = timedelta(seconds=job.until - self.clock())
            lease = await self.client.create_lease(
                f"shoal-preheat-{job.target.digest.hex[:16]}-{int(self.clock())}",
                expire=ttl, labels={"io.shoal.preheat": job.to_json()["ref"][:60]},
            )  # fmt: skip
            job.lease = lease.id
            for desc in await self._manifests(job):
                body = await self._manifest_body(job, desc)
                media_type = manifest_media_type(body, desc.media_type) or ""
                parts = [c for c, _, _ in children(parse_manifest(body) or {}, media_type)]
                blobs = [Descriptor(p.media_type, Digest.parse(p.digest), p.size) for p in parts]
                job.bytes_total += sum(b.size for b in blobs)
                for blob in blobs:
                    await self._keep(job, blob)
            job.state = "kept"
            log.info("preheated %s: %d blobs kept until the kubelet pulls", job.to_json()["ref"],
                     len(job.digests))  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            job.state, job.error = "failed", str(exc)[:300]
            log.warning("preheat of %s failed: %s", job.to_json()["ref"], exc)
            if job.lease:
                await self._release(job)
        finally:
            job.finished = self.clock()
            self._count()
            self.on_change()

    async def _manifests(self, job: Job) -> list[Descriptor]:
        """The image manifests to keep: the target, or its index's manifests for this node's
        platform (a node pulls its own platform only). The index itself is kept too."""
        body = await self._manifest_body(job, job.target)
        media_type = manifest_media_type(body, job.target.media_type) or ""
        if media_type not in INDEX_TYPES:
            return [Descriptor(media_type, job.target.digest, job.target.size)]
        os_name, arch = host_platform()
        wanted = []
        for child, _, plat in children(parse_manifest(body) or {}, media_type):
            if isinstance(plat, dict) and (plat.get("os"), plat.get("architecture")) == (
                os_name, arch,
            ):  # fmt: skip
                wanted.append(Descriptor(child.media_type, Digest.parse(child.digest), child.size))
        if not wanted:
            raise ValueError(f"the index lists no manifest for {os_name}/{arch}")
        return wanted

    async def _manifest_body(self, job: Job, desc: Descriptor) -> bytes:
        if desc.size > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest {desc.digest} is too large")
        blob = await self._find(job, desc.digest, "manifest")
        body = b"".join([c async for c in verified_chunks(blob, desc.digest, 0, blob.size)])
        await self._write(job, desc.digest, len(body), _once(body))
        return body

    async def _keep(self, job: Job, desc: Descriptor) -> None:
        if await self.client.info(desc.digest) is None:
            blob = await self._find(job, desc.digest, "blob")
            if blob.size != desc.size:
                raise ValueError(f"{desc.digest} is {blob.size} bytes, not {desc.size}")

            async def counted() -> AsyncIterator[bytes]:
                async for chunk in verified_chunks(blob, desc.digest, 0, blob.size):
                    job.bytes_done += len(chunk)
                    yield chunk

            await self._write(job, desc.digest, desc.size, counted())
        else:
            job.bytes_done += desc.size
            await self._write(job, desc.digest, desc.size, _once(b""), present=True)

    async def _find(self, job: Job, digest: Digest, kind: str) -> Blob:
        ref = Reference(job.ref.registry, job.ref.repository, digest=digest)
        for source in self.chain.sources:
            blob = await source.find(ref, digest, "manifest" if kind == "manifest" else "blob")
            if blob is not None:
                return blob
        raise ValueError(f"no source holds {digest}")

    async def _write(
        self, job: Job, digest: Digest, size: int, chunks: AsyncIterator[bytes],
        present: bool = False,
    ) -> None:  # fmt: skip
        if present or await self.client.info(digest) is not None:
            # Held already: the lease must still cover it, or a GC could take it before the pull.
            await self.client.add_lease_resource(job.lease, str(digest))
        else:
            await self.client.write_stream(
                chunks, size, str(digest), ref=f"shoal-preheat-{digest}", lease=job.lease
            )
        job.digests.add(str(digest))

    # -- keeping ---------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Releases what the kubelet pulled, expires what it never did, forgets old jobs."""
        changed = False
        now = self.clock()
        for digest, job in list(self.jobs.items()):
            if job.state == "kept" and job.until <= now:
                job.state, job.finished, changed = "expired", now, True
            elif job.state == "kept" and job.ref.image_name:
                image = await self.client.get_image(job.ref.image_name)
                if image is not None and image.target.digest == str(job.target.digest):
                    job.state, job.finished, changed = "pulled", now, True
                    await self._release(job)
            if job.finished is not None and now - job.finished > FORGET_AFTER:
                del self.jobs[digest]
        if changed:
            self._count()
            self.on_change()

    async def _extend(self, job: Job) -> None:
        ttl = timedelta(seconds=job.until - self.clock())
        old = job.lease
        lease = await self.client.create_lease(
            f"shoal-preheat-{job.target.digest.hex[:16]}-{int(self.clock())}", expire=ttl
        )
        for digest in job.digests:
            await self.client.add_lease_resource(lease.id, digest)
        job.lease = lease.id
        await self.client.delete_lease(old)

    async def _release(self, job: Job) -> None:
        try:
            await self.client.delete_lease(job.lease)
        except Exception as exc:  # it expires by itself
            log.warning("could not release the preheat lease %s: %s", job.lease, exc)

    def _count(self) -> None:
        for state in STATES:
            metrics.PREHEATS.labels(state).set(sum(j.state == state for j in self.jobs.values()))

    def _spawn(self, call: Any) -> None:
        task = asyncio.ensure_future(call)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, every: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("preheat refresh failed: %s", exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    if body:
        yield body
