"""An image's blobs fetched from upstream in the order containerd unpacks them.

Why, and what it costs: README, "Upstream, once per cluster", point 4. The image's designated
node (`shoal.fetch.designate`) gives every blob nobody has a spool Fetch at once (advertised, so
peers and containerd can join it and wait), but a blob's download starts only when the one
`streams` places before it is over, or after `hold` seconds. Blobs smaller than `ungated_below`
start at once: they cost the link little, and nodes relay them, and a relaying node gives up on
a peer that stays silent too long (`shoal.registry.transfer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from shoal.content.model import STREAMED, Blob, Delivery, Descriptor, SourceKind
from shoal.fetch.spool import Fetch
from shoal.oci.digest import Digest
from shoal.oci.errors import DigestInvalid
from shoal.oci.manifest import children
from shoal.oci.mediatypes import MANIFEST_TYPES, manifest_media_type, parse_manifest
from shoal.oci.names import Reference

log = logging.getLogger("shoal.imageorder")
T = TypeVar("T")
PREPARE_AT_ONCE = 8  # lookups and upstream HEADs in flight per image (an image may list 1000s)


Where = tuple[str | None, str]  # registry and repository an image was fetched from


@dataclass(frozen=True)
class ImageParts:
    """An image manifest and the blobs it references, config first, then layers in order."""

    manifest: Digest
    body: bytes
    blobs: tuple[Descriptor, ...]
    where: Where = (None, "")


def image_parts(digest: Digest, body: bytes, where: Where = (None, "")) -> ImageParts | None:
    """The parts of an image manifest (verified `body` of `digest`); None for anything else."""
    media_type = manifest_media_type(body)
    doc = parse_manifest(body)
    if doc is None or media_type not in MANIFEST_TYPES:
        return None
    blobs = []
    for desc, _, _ in children(doc, media_type):
        try:
            blobs.append(Descriptor(desc.media_type, Digest.parse(desc.digest), desc.size))
        except DigestInvalid:
            continue
    return ImageParts(digest, body, tuple(blobs), where)


class Images:
    """Image manifests this node fetched from upstream lately: which image a blob belongs to.

    Bounded: the `max_images` most recently learned (their bodies at most `max_bytes` together),
    each for `ttl` seconds. A manifest is immutable under its digest, so its verified bytes may
    be served again while remembered, for the repository it came from.
    """

    def __init__(
        self,
        max_images: int = 256,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._bytes = 0
        self.ttl = ttl
        self.clock = clock
        self._images: OrderedDict[Digest, tuple[ImageParts, float]] = OrderedDict()
        self._owner: dict[Digest, Digest] = {}  # blob -> manifest
        self._fetching: dict[tuple[Where, Digest], asyncio.Future[Any]] = {}

    async def once(self, where: Where, digest: Digest, fetch: Callable[[], Awaitable[T]]) -> T:
        """`fetch()`, shared by everyone asking for the same manifest while it runs."""
        key = (where, digest)
        flight = self._fetching.get(key)
        if flight is None:
            flight = asyncio.ensure_future(fetch())
            self._fetching[key] = flight
            flight.add_done_callback(lambda _: self._fetching.pop(key, None))
        return cast(T, await asyncio.shield(flight))

    def learn(self, digest: Digest, body: bytes, where: Where = (None, "")) -> ImageParts | None:
        parts = image_parts(digest, body, where)
        if parts is None:
            return None
        self._forget(digest)
        self._images[digest] = (parts, self.clock() + self.ttl)
        self._bytes += len(body)
        for desc in parts.blobs:
            self._owner[desc.digest] = digest
        while len(self._images) > self.max_images or self._bytes > self.max_bytes:
            self._forget(next(iter(self._images)))
        return parts

    def get(self, manifest: Digest, where: Where | None = None) -> ImageParts | None:
        """The image, if remembered (and fetched from `where`, when given)."""
        entry = self._images.get(manifest)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            self._forget(manifest)
            return None
        return entry[0] if where is None or entry[0].where == where else None

    def image_of(self, blob: Digest) -> ImageParts | None:
        manifest = self._owner.get(blob)
        return None if manifest is None else self.get(manifest)

    def _forget(self, manifest: Digest) -> None:
        entry = self._images.pop(manifest, None)
        if entry is None:
            return
        self._bytes -= len(entry[0].body)
        for desc in entry[0].blobs:
            if self._owner.get(desc.digest) == manifest:
                del self._owner[desc.digest]


class GatedBlob:
    """A Blob whose reading starts once `before` is over (done or failed), or after `hold`."""

    def __init__(self, blob: Blob, before: Fetch, hold: float | None = None) -> None:
        self.blob = blob
        self.before = before
        self.hold = hold
        self.size: int = blob.size
        self.source: SourceKind = blob.source

    def delivery(self) -> Delivery:
        return STREAMED

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.before.over(), self.hold)
        async for chunk in self.blob.open(start, end):
            yield chunk


# What the ordered fetch needs from the rest of shoal, as plain callables (unit tests pass fakes).
Running = Callable[[Digest], Fetch | None]
Needed = Callable[[Reference, Digest], Awaitable[bool]]
FindUpstream = Callable[[Reference, Digest], Awaitable[Blob | None]]
Start = Callable[[Digest, Blob], Fetch | None]


class OrderedFetches:
    """Starts images' upstream downloads in manifest order, `streams` at a time; once per image
    while its downloads run (concurrent callers wait for the same start). `images` remembers
    which image a blob belongs to: only with this ordering may blobs follow their image."""

    def __init__(
        self,
        *,
        running: Running,
        needed: Needed,
        upstream: FindUpstream,
        start: Start,
        streams: int = 1,
        ungated_below: int = 1024 * 1024,
        hold: float | None = None,
        images: Images | None = None,
    ) -> None:
        self.images = images if images is not None else Images()
        self.running = running
        self.needed = needed
        self.upstream = upstream
        self.start_fetch = start
        self.streams = max(1, streams)
        self.ungated_below = ungated_below
        self.hold = hold
        self._plans: dict[Digest, asyncio.Future[list[Fetch]]] = {}
        self._forgetters: set[asyncio.Future[None]] = set()

    async def start(self, ref: Reference, parts: ImageParts) -> None:
        """Returns once every blob of `parts` that nobody has has a Fetch (running or queued)."""
        plan = self._plans.get(parts.manifest)
        if plan is None:
            plan = asyncio.ensure_future(self._plan(ref, parts))
            self._plans[parts.manifest] = plan
            plan.add_done_callback(lambda p: self._planned(parts.manifest, p))
        try:
            await asyncio.shield(plan)
        except Exception as exc:  # the blobs are then fetched one by one, as asked for
            log.warning("ordered fetch of %s not started: %r", parts.manifest, exc)

    async def _plan(self, ref: Reference, parts: ImageParts) -> list[Fetch]:
        # Asked a few at a time: whether the blob is held anywhere, and upstream's answer for it.
        asking = asyncio.Semaphore(PREPARE_AT_ONCE)

        async def prepare(desc: Descriptor) -> tuple[Fetch | None, Blob | None]:
            """The blob's running Fetch, or else upstream's blob when nobody holds it."""
            running = self.running(desc.digest)
            if running is not None:
                return running, None
            async with asking:
                if not await self.needed(ref, desc.digest):
                    return None, None
                return None, await self.upstream(ref, desc.digest)

        prepared = await asyncio.gather(*(prepare(d) for d in parts.blobs))
        fetches: list[Fetch] = []  # the gated chain, in manifest order
        for desc, (fetch, blob) in zip(parts.blobs, prepared, strict=True):
            if fetch is None and blob is not None:
                if blob.size >= self.ungated_below and len(fetches) >= self.streams:
                    blob = GatedBlob(blob, fetches[-self.streams], self.hold)
                fetch = self.start_fetch(desc.digest, blob)
                # None: spool full; asked for later, the blob streams unshared
            if fetch is not None and fetch.size >= self.ungated_below:
                fetches.append(fetch)
        log.info(
            "fetching %d of %d blobs of %s in order, %d at a time",
            len(fetches), len(parts.blobs), parts.manifest, self.streams,
        )  # fmt: skip
        return fetches

    def _planned(self, manifest: Digest, plan: asyncio.Future[list[Fetch]]) -> None:
        """Forgets the image once its downloads are over: a later pull plans afresh."""
        if plan.cancelled() or plan.exception() is not None or not plan.result():
            self._plans.pop(manifest, None)
            return
        fetches = plan.result()

        async def forget() -> None:
            await asyncio.gather(*(f.over() for f in fetches))
            if self._plans.get(manifest) is plan:
                del self._plans[manifest]

        task = asyncio.ensure_future(forget())
        self._forgetters.add(task)
        task.add_done_callback(self._forgetters.discard)

    async def close(self) -> None:
        tasks: list[asyncio.Future[Any]] = [*self._plans.values(), *self._forgetters]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
