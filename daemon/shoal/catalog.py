"""What this node holds, as routing keys, kept in step with the router's advertisements.

Keys are every digest of every image the node holds (index, the manifests present, configs,
layers) and every tag as `<registry>/<repo>:<tag>` (containerd's image name). The catalog is
rebuilt in full at start, after image events (debounced), after every event-stream break, and
on a timer (containerd 1.6 publishes no event when content is added). Only differences are sent
to the router: new keys advertised, vanished keys withdrawn. Digests `shoal.integrity`
quarantined are withdrawn at once and left out until their quarantine is lifted.

The advertised set is also kept on disk: a shoal that was killed and restarted withdraws what
its earlier run advertised but the node no longer holds, instead of leaving those records to
expire on the peers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol

from shoal import metrics
from shoal.containerd.client import ContainerdClient
from shoal.containerd.model import ContainerdError, Event
from shoal.containerd.watch import watch

log = logging.getLogger("shoal.catalog")

# Events come in bursts (a pull creates up to three image records): one rebuild per burst.
DEBOUNCE = 0.3


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


async def node_keys(client: ContainerdClient) -> set[str]:
    """Every key this node can serve now, read from containerd."""
    images = await client.list_images()
    present = {info.digest for info in await client.list_content()}
    keys: set[str] = set()
    for image in images:
        walked = await client.walk_image(image, present)
        keys |= walked.digests
        tag = tag_key(image.name)
        if tag is not None and image.target.digest in present:
            keys.add(tag)
    return keys


class Catalog:
    def __init__(
        self,
        client: ContainerdClient,
        router: Advertiser,
        resync_interval: float,
        read_keys: Callable[[ContainerdClient], Awaitable[set[str]]] = node_keys,
        state_file: Path | None = None,
    ) -> None:
        self.client = client
        self.router = router
        self.resync_interval = resync_interval
        self.read_keys = read_keys
        self.state_file = state_file
        self.keys: set[str] = set()
        self.excluded: set[str] = set()  # quarantined digests: never advertised (`exclude`)
        self._leftover = self._load()  # withdrawn at the first sync unless still held
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self.synced = asyncio.Event()

    async def sync(self) -> None:
        async with self._lock:
            if self._leftover:
                await self._router_ready()
            keys = await self.read_keys(self.client) - self.excluded
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

    async def _on_event(self, event: Event) -> None:
        self._dirty.set()

    async def _on_resync(self) -> None:
        await self.sync()

    async def _rebuild_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.resync_interval)
                await asyncio.sleep(DEBOUNCE)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self.sync()
            except ContainerdError as exc:
                log.warning("catalog sync failed, retrying: %s", exc)
                self._dirty.set()
                await asyncio.sleep(1)

    async def run(self) -> None:
        """Runs until cancelled: the event watcher and the rebuild loop."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(watch(self.client, self._on_event, self._on_resync))
            tasks.create_task(self._rebuild_loop())
