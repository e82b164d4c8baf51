"""Liveness and readiness: `/healthz`, `/readyz`, `/metrics` and `/debug/providers` on the
metrics port, and the periodic check that containerd still answers.

`/readyz` is 503 while containerd does not answer its Version call (checked every few seconds),
before the catalog first synced, and while routing is not ready (no peer yet); 200 otherwise.
containerd going away is said once in the log, and once when it is back, never per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from aiohttp import web

from shoal import metrics
from shoal.containerd.model import ContainerdError
from shoal.routing.base import Peer
from shoal.tenancy.admission import is_local

log = logging.getLogger("shoal")


class VersionClient(Protocol):
    async def version(self) -> str: ...


class RoutingView(Protocol):
    def ready(self) -> bool: ...

    def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]: ...


class ContainerdHealth:
    """`ok` while containerd answered its last Version call within `timeout` seconds."""

    def __init__(self, client: VersionClient, interval: float = 2.0, timeout: float = 2.0) -> None:
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self.ok = True  # the daemon starts only once containerd answered

    async def check(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.version()
        except (ContainerdError, TimeoutError) as exc:
            if self.ok:
                log.warning(
                    "containerd is not answering (%s): not ready, its tags and manifests are "
                    "misses until it is back",
                    str(exc) or "no answer in time",
                )
            self.ok = False
        else:
            if not self.ok:
                log.info("containerd is answering again")
            self.ok = True
        return self.ok

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()


def health_app(ready: Callable[[], bool], router: RoutingView) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.Response(status=200 if ok else 503, text="ready\n" if ok else "not ready\n")

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def providers(request: web.Request) -> web.Response:
        """Which peers the DHT names for a key: what this node's pulls would try. Asked from
        the node itself only: a lookup costs the cluster work."""
        if not is_local(request.remote):
            return web.json_response({"error": "ask from the node itself"}, status=403)
        key = request.query.get("key", "")
        if not key or len(key) > 512:
            return web.json_response({"error": "?key=<digest or registry/repo:tag>"}, status=400)
        if not router.ready():  # not started, or no peer yet: nothing to ask
            return web.json_response({"error": "routing not ready"}, status=503)
        found = [{"id": p.id, "address": p.address} async for p in router.lookup(key, 20)]
        return web.json_response({"key": key, "providers": found})

    app = web.Application()
    app.router.add_get("/debug/providers", providers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
