"""`shoal run`: wires containerd, the sources and the HTTP servers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from shoal import logs, metrics
from shoal.catalog import Catalog
from shoal.config import Settings
from shoal.containerd.client import ContainerdClient
from shoal.containerd.imagecache import ImageCache
from shoal.fetch.designate import Designation
from shoal.fetch.imageorder import OrderedFetches
from shoal.fetch.sharing import SharedFetches
from shoal.fetch.spool import Spool
from shoal.health import ContainerdHealth, health_app
from shoal.oci.digest import Digest
from shoal.registry.app import make_app
from shoal.registry.httpserver import RegistryRunner, ServerLimits
from shoal.registry.transfer import PeerTransfer
from shoal.routing.base import Peer, Router
from shoal.routing.factory import make_router
from shoal.sources.chain import SourceChain
from shoal.sources.inflight import InFlightSource
from shoal.sources.local import LocalSource
from shoal.sources.nodestore import ContainerdStore
from shoal.sources.peers import PeerSource
from shoal.sources.tags import TagPolicy
from shoal.sources.upstream import UpstreamFetcher
from shoal.upstream import UpstreamSource

log = logging.getLogger("shoal")

# In-flight pulls get this long to finish after SIGTERM before connections are closed.
SHUTDOWN_GRACE = 10.0


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ValueError(f"address needs a port: {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = ContainerdClient(
            settings.containerd_socket,
            namespace=settings.containerd_namespace,
            content_root=settings.content_root or None,
        )
        self.router: Router = make_router(settings, split_host_port(settings.listen)[1])
        self.peers = PeerSource(self.router)
        self.transfer = PeerTransfer(
            redirect=settings.peer_transfer == "redirect",
            relay_timeout=self.peers.settings.read_timeout,
        )
        self.health = ContainerdHealth(self.client)
        # Image records for requests, kept while the catalog's event stream says nothing changed.
        self.images = ImageCache(self.client, available=lambda: self.health.ok)
        self.catalog = Catalog(
            self.client,
            self.router,
            settings.resync_interval,
            state_file=Path(settings.data_dir) / "advertised.json",
            listener=self.images,
        )
        # The registry and the spool verify every byte already; a third hash would only cost.
        self.upstream = UpstreamSource.from_settings(settings, verify_blobs=False)
        self.store = ContainerdStore(self.images)
        self.limits = ServerLimits(
            header_timeout=settings.http_header_timeout,
            idle_timeout=settings.http_idle_timeout,
            write_timeout=settings.http_write_timeout,
            max_per_client=settings.http_max_connections_per_client,
            max_connections=settings.http_max_connections,
        )
        self.spool = Spool(
            Path(settings.data_dir) / "spool",
            settings.spool_max_bytes,
            held_locally=self._held_locally,
        )
        self.runners: list[web.AppRunner] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.routing_metrics: metrics.RoutingCollector | None = None
        self.ordered: OrderedFetches | None = None

    def ready(self) -> bool:
        return self.health.ok and self.catalog.synced.is_set() and self.router.ready()

    async def start(self) -> None:
        await self.client.connect()
        version = await self.client.version()
        root = await self.client.content_root()
        log.info(
            "containerd %s, namespace %s, content %s",
            version,
            self.settings.containerd_namespace,
            root,
        )
        local = LocalSource(self.store)
        sharing = SharedFetches(self.spool, self.router)
        inflight = InFlightSource(sharing)

        ordered = None
        if self.settings.ordered_streams > 0:
            ordered = OrderedFetches(
                running=self.spool.get,
                needed=sharing.needed,
                upstream=lambda ref, digest: self.upstream.find(ref, digest, "blob"),
                start=sharing.start,
                streams=self.settings.ordered_streams,
                # Blobs other nodes relay must not wait longer than they wait for a peer.
                ungated_below=self.transfer.redirect_min,
                hold=self.transfer.longest_silence(),
            )
        self.ordered = ordered
        images = None if ordered is None else ordered.images
        designation = Designation(self.router, self._me, images)

        def fetcher(delegate: bool) -> UpstreamFetcher:
            return UpstreamFetcher(
                self.upstream, sharing, designation, self.peers, delegate=delegate, ordered=ordered
            )

        chain = SourceChain(
            [local, inflight, self.peers, fetcher(True)],
            peer_sources=[local, inflight],
            fetch_sources=[local, inflight, fetcher(False)],
            tags=TagPolicy(self.settings.tag_policy, self.upstream),
        )
        # The registry first: bootstrap of other nodes asks it for this node's peer ID.
        app = make_app(
            chain, p2p_info=lambda: self.router.node_info().to_json(), transfer=self.transfer
        )
        await self._serve(app, self.settings.listen, "registry")
        await self._serve(
            health_app(self.ready, self.router), self.settings.metrics_listen, "metrics"
        )
        await self.router.start()
        self.routing_metrics = metrics.watch_routing(self.router.stats)
        self.tasks.append(asyncio.create_task(self.catalog.run(), name="catalog"))
        self.tasks.append(asyncio.create_task(self.health.run(), name="containerd-health"))
        self.tasks.append(asyncio.create_task(self._gauges(), name="gauges"))

    async def _serve(self, app: web.Application, address: str, what: str) -> None:
        runner = RegistryRunner(app, self.limits, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        host, port = split_host_port(address)
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        self.runners.append(runner)
        log.info("%s listening on %s", what, address)

    async def _gauges(self) -> None:
        while True:
            metrics.PEERS.set(len(self.router.members()))
            await asyncio.sleep(2.0)

    async def _held_locally(self, digest: Digest) -> bool:
        return await self.store.content_size(digest) is not None

    def _me(self) -> Peer | None:
        node_id = self.router.node_info().id
        return Peer(node_id, self.settings.listen) if node_id else None

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for runner in reversed(self.runners):
            await runner.cleanup()
        if self.routing_metrics is not None:
            metrics.REGISTRY.unregister(self.routing_metrics)
        if self.ordered is not None:
            await self.ordered.close()
        await self.spool.close()
        await self.upstream.close()
        await self.peers.close()
        await self.router.stop()
        await self.client.close()


async def _main(settings: Settings) -> int:
    daemon = Daemon(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
        log.info("shoal ready")
        await stop.wait()
        log.info("stopping")
    finally:
        await daemon.stop()
    return 0


def run_daemon(settings: Settings) -> int:
    logs.setup(settings.log_level)
    try:
        return asyncio.run(_main(settings))
    except Exception as exc:  # a start-up failure: one clear line, then a non-zero exit
        log.error("shoal failed: %s", exc, exc_info=settings.log_level == "debug")
        return 1
