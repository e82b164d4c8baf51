"""What this node holds, as routing keys, kept in step with the router's advertisements.

Keys are every digest of every image the node holds (index, the manifests present, configs,
layers) and every tag as `<registry>/<repo>:<tag>` (containerd's image name); the daemon passes
only the keys of images it may share (`shoal.tenancy.access`). The catalog is
rebuilt in full at start, after image events (debounced), after every event-stream break, and
on a timer (containerd 1.x publishes no event when content is added). Only differences are sent
to the router: new keys advertised, vanished keys withdrawn. Digests `shoal.integrity`
quarantined are withdrawn at once and left out until their quarantine is lifted.

containerd 2.1+ publish /content/create when a blob is committed. Its digest is advertised at
once (debounced), before any image names it: during a rollout, the layers a node has finished
are what the others can fetch from it while its pull goes on, and a committed blob is served
like any other (shoal serves content by digest, whatever image it belongs to) when it may be
shared: the daemon's `shareable` decides (`shoal.tenancy.access`). Such digests stay
advertised while containerd holds them; full rebuilds check that, until an image covers them.

The advertised set is also kept on disk: a shoal that was killed and restarted withdraws what
its earlier run advertised but the node no longer holds, instead of leaving those records to
expire on the peers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol

from shoal import metrics
from shoal.containerd.client import ContainerdClient
from shoal.containerd.events import CONTENT_CREATE
from shoal.containerd.model import ContainerdError, Event
from shoal.containerd.watch import watch
from shoal.tenancy.access import HeldImage, operator_choice, split_image_name

log = logging.getLogger("shoal.catalog")

# Events come in bursts (a pull creates up to three image records): one rebuild per burst.
DEBOUNCE = 0.3
# s before a rebuild that failed on a fault of ours is retried (doubling while it keeps failing)
FAULT_PAUSE, FAULT_PAUSE_MAX = 1.0, 300.0


class StoreListener(Protocol):
    """Told what the event stream says (shoal.containerd.imagecache.ImageCache)."""

    def changed(self, event: Event) -> None: ...

    def stream_down(self) -> None: ...

    def stream_up(self) -> None:
        """The stream is live again and the catalog resynced over it."""
        ...


class Advertiser(Protocol):
    """What the catalog needs of the router."""

    async def advertise(self, keys: Iterable[str]) -> None: ...

    async def withdraw(self, keys: Iterable[str]) -> None: ...

    def ready(self) -> bool: ...


def tag_key(image_name: str) -> str | None:
    """The routing key of an image record that names a tag, or None (digest-only records)."""
    last = image_name.rsplit("/", 1)[-1]
    if "@" in image_name or ":" not in last or "/" not in image_name:
        return None
    return image_name


async def node_images(client: ContainerdClient) -> list[HeldImage]:
    """Every image record of the node and what of it the node holds, read from containerd."""
    images = await client.list_images()
    present = {info.digest for info in await client.list_content()}
    held: list[HeldImage] = []
    for image in images:
        where = split_image_name(image.name)
        if where is None:
            continue
        walked = await client.walk_image(image, present)
        manifests = frozenset(b.digest for b in walked.blobs if b.kind in ("index", "manifest"))
        tag = tag_key(image.name) is not None and image.target.digest in present
        held.append(
            HeldImage(
                *where,
                image.name,
                image.target.digest,
                walked.digests,
                manifests,
                tag,
                shared=operator_choice(image.labels),
            )
        )
    return held


async def node_keys(client: ContainerdClient) -> set[str]:
    """Every key this node can serve now, read from containerd."""
    keys: set[str] = set()
    for image in await node_images(client):
        keys |= image.digests | ({image.name} if image.tag else set())
    return keys


async def committed(client: ContainerdClient, digest: str) -> bool:
    """Whether containerd still holds the blob."""
    return await client.info(digest) is not None


class Catalog:
    def __init__(
        self,
        client: ContainerdClient,
        router: Advertiser,
        resync_interval: float,
        read_keys: Callable[[ContainerdClient], Awaitable[set[str]]] = node_keys,
        state_file: Path | None = None,
        holds: Callable[[ContainerdClient, str], Awaitable[bool]] = committed,
        shareable: Callable[[str], Awaitable[bool]] | None = None,
        listener: StoreListener | None = None,
    ) -> None:
        self.client = client
        self.listener = listener
        self.router = router
        self.resync_interval = resync_interval
        self.read_keys = read_keys
        self.holds = holds
        self.shareable = shareable
        self.state_file = state_file
        self.keys: set[str] = set()
        self.excluded: set[str] = set()  # quarantined digests: never advertised (`exclude`)
        self._leftover = self._load()  # withdrawn at the first sync unless still held
        self._committed: set[str] = set()  # from /content/create, not yet part of an image
        self._full = False  # whether the next rebuild must re-read everything
        self._synced_at = time.monotonic()
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self.synced = asyncio.Event()

    async def sync(self) -> None:
        async with self._lock:
            self._synced_at = time.monotonic()
            keys = await self.read_keys(self.client)  # also what may be shared, at once
            keys |= await self._still_committed(keys)
            if self._leftover:
                await self._router_ready()
            keys -= self.excluded
            added, removed = keys - self.keys, (self.keys | self._leftover) - keys
            self._leftover = set()
            if removed:
                await self.router.withdraw(removed)
            if added:
                await self.router.advertise(added)
            self.keys = keys
            if added or removed:
                self._save()
            metrics.ADVERTISED.set(len(keys))
            self.synced.set()
            if added or removed:
                log.info("catalog: %d keys (+%d, -%d)", len(keys), len(added), len(removed))
                log.debug("catalog: added %s, removed %s", sorted(added), sorted(removed))

    async def _still_committed(self, image_keys: set[str]) -> set[str]:
        """Committed blobs no image names yet (a pull under way) that containerd still holds."""
        self._committed -= image_keys
        for digest in list(self._committed):
            if not await self.holds(self.client, digest):
                self._committed.discard(digest)
        # A copy: the sharing check awaits, and containerd may report more blobs meanwhile.
        return {d for d in list(self._committed) if await self._shareable(d)}

    async def add_committed(self) -> None:
        """Advertises the blobs containerd reported committed, without re-reading the store."""
        async with self._lock:
            added = {
                d for d in self._committed - self.keys - self.excluded if await self._shareable(d)
            }
            if not added:
                return
            await self.router.advertise(added)
            self.keys |= added
            self._save()
            metrics.ADVERTISED.set(len(self.keys))
            log.info("catalog: %d keys (+%d committed)", len(self.keys), len(added))

    async def _shareable(self, digest: str) -> bool:
        return self.shareable is None or await self.shareable(digest)

    async def exclude(self, key: str) -> None:
        """Withdraws `key` at once, and keeps it out of every later sync until `include`."""
        self.excluded.add(key)
        async with self._lock:
            if key in self.keys:
                self.keys.discard(key)
                self._save()
                metrics.ADVERTISED.set(len(self.keys))
        await self.router.withdraw([key])

    def include(self, key: str) -> None:
        """`key` may be advertised again: the next sync (soon) does it if the node holds it."""
        self.excluded.discard(key)
        self._full = True  # a full rebuild: the key may belong to an image
        self._dirty.set()

    async def _router_ready(self, timeout: float = 30.0) -> None:
        """A withdrawal sent before the router knows any peer reaches nobody: wait a little."""
        for _ in range(int(timeout / 0.2)):  # the router offers no readiness event to await
            if self.router.ready():
                return
            await asyncio.sleep(0.2)

    def _load(self) -> set[str]:
        """Keys an earlier run advertised: withdrawn at the first sync unless still held."""
        if self.state_file is None:
            return set()
        try:
            keys = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return set()
        return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()

    def _save(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(sorted(self.keys)))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot record advertised keys in %s: %s", self.state_file, exc)

    def poke(self) -> None:
        """Asks for a rebuild soon (what may be shared changed)."""
        self._dirty.set()

    async def _on_event(self, event: Event) -> None:
        if event.topic == CONTENT_CREATE and event.digest:
            self._committed.add(event.digest)
        else:
            self._full = True
        self._dirty.set()
        if self.listener is not None:
            self.listener.changed(event)

    async def _on_resync(self) -> None:
        await self.sync()
        if self.listener is not None:
            self.listener.stream_up()

    def _on_break(self, err: Exception) -> None:
        if self.listener is not None:
            self.listener.stream_down()

    async def _rebuild_loop(self) -> None:
        pause = FAULT_PAUSE
        while True:
            # Content events are frequent and need no full rebuild: the timer is not reset by them.
            left = self.resync_interval - (time.monotonic() - self._synced_at)
            try:
                await asyncio.wait_for(self._dirty.wait(), max(left, 0))
                await asyncio.sleep(DEBOUNCE)
            except TimeoutError:
                self._full = True
            full, self._full = self._full, False
            self._dirty.clear()
            try:
                await (self.sync() if full else self.add_committed())
            except ContainerdError as exc:
                log.warning("catalog sync failed, retrying: %s", exc)
                self._full = True
                self._dirty.set()
                await asyncio.sleep(1)
            except Exception:
                # A fault of ours: one rebuild lost, not the node's advertising for good.
                log.exception("catalog rebuild failed; a full one follows in %.0f s", pause)
                self._full = True
                self._dirty.set()
                await asyncio.sleep(pause)
                pause = min(pause * 2, FAULT_PAUSE_MAX)
            else:
                pause = FAULT_PAUSE

    async def run(self) -> None:
        """Runs until cancelled: the event watcher and the rebuild loop."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(
                watch(self.client, self._on_event, self._on_resync, on_break=self._on_break)
            )
            tasks.create_task(self._rebuild_loop())
