"""`shoal run`: wires containerd, the sources and the HTTP servers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from shoal import logs, metrics
from shoal.catalog import Catalog, node_images
from shoal.config import Settings
from shoal.containerd.client import ContainerdClient
from shoal.containerd.imagecache import ImageCache
from shoal.containerd.ingest import IngestClient
from shoal.content.model import Source
from shoal.fetch.designate import Designation
from shoal.fetch.imageorder import OrderedFetches
from shoal.fetch.sharing import SharedFetches
from shoal.fetch.spool import Spool
from shoal.health import ContainerdHealth, health_app
from shoal.herd.serving import Herd
from shoal.integrity.guard import Integrity
from shoal.integrity.ledger import Ledger, keep_saved
from shoal.integrity.scrub import Scrub, ScrubSettings
from shoal.observe.facts import NodeParts
from shoal.observe.recorder import LastProblem, Recorder
from shoal.observe.routes import add_status_routes
from shoal.observe.timing import TimedLookup, TimedTags
from shoal.oci.digest import Digest
from shoal.preheat.admin import HOLD_PATH, Coordinator, PreheatedStore, admin_routes, hold
from shoal.preheat.keeper import Keeper
from shoal.registry.app import make_app
from shoal.registry.httpserver import RegistryRunner, ServerLimits
from shoal.registry.transfer import PeerTransfer
from shoal.routing.base import Peer, Router
from shoal.routing.bootstrap import ip_of_multiaddr
from shoal.routing.factory import make_router
from shoal.sources.holders import Holders
from shoal.sources.inflight import InFlightSource
from shoal.sources.local import LocalSource
from shoal.sources.nodestore import ContainerdStore
from shoal.sources.peers import PeerSource
from shoal.sources.spooled import SpooledPeers
from shoal.sources.tags import TagPolicy
from shoal.sources.upstream import UpstreamFetcher
from shoal.tenancy.access import Access
from shoal.tenancy.admission import Admission, parse_networks
from shoal.tenancy.credentialed import CredentialedUpstream
from shoal.tenancy.gate import AnonymousUpstream, gated_chain
from shoal.tenancy.keys import load_cluster_key
from shoal.tenancy.policy import SharePolicy
from shoal.tenancy.refusals import Refusals
from shoal.tenancy.signer import PeerSigner
from shoal.tenancy.status import Prober, StatusStore
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
        # The write side too: preheated images are written into the node's store.
        self.client = IngestClient(
            settings.containerd_socket,
            namespace=settings.containerd_namespace,
            content_root=settings.content_root or None,
        )
        key = load_cluster_key(settings.cluster_key_file)
        self.signer = signs = PeerSigner(key, self._my_id)
        port = split_host_port(settings.listen)[1]
        self.router: Router = make_router(settings, port, psk=key.p2p_psk())
        self.recorder = Recorder()
        self.refusals = Refusals(listener=self.recorder.refused)
        self.admission = Admission(
            key,
            self._my_id,
            local_networks=parse_networks(settings.local_addresses),
            refused=self.refusals,
        )
        self.holders = held = Holders()
        self.herd = herd = Herd(self.router.members, settings.herd_fanout, me=self._my_id)
        self.peers = PeerSource(TimedLookup(self.router), holders=held, signer=signs, herd=herd)
        self.problems = LastProblem()
        self.containerd_version = ""
        self.transfer = PeerTransfer(
            redirect=settings.peer_transfer == "redirect", asked=self.holders
        )
        # The registry and the spool verify every byte already; a third hash would only cost.
        # Everything fetched for the cluster goes anonymously; credentials serve this node only.
        anonymous = replace(settings, upstream_credentials="")
        self.upstream = UpstreamSource.from_settings(anonymous, verify_blobs=False)
        self.credentialed = (
            CredentialedUpstream(UpstreamSource.from_settings(settings, verify_blobs=False))
            if settings.upstream_credentials
            else None
        )
        policy = SharePolicy(
            settings.share_registries, settings.share_repositories, settings.share_unknown
        )
        self.access = Access(
            StatusStore(Path(settings.data_dir) / "access.json"),
            policy,
            Prober(self.upstream),
            refresh=settings.status_refresh,
            on_change=lambda: self.catalog.poke(),
            listed=self.upstream.allowlist.registries,
        )
        self.health = ContainerdHealth(self.client)
        # Image records for requests, kept while the catalog's event stream says nothing changed.
        self.images = ImageCache(self.client, available=lambda: self.health.ok)
        self.catalog = Catalog(
            self.client,
            self.router,
            settings.resync_interval,
            read_keys=self._shareable_keys,
            state_file=Path(settings.data_dir) / "advertised.json",
            shareable=self._committed_shareable,
            listener=self.images,
        )
        self.keeper: Keeper | None = None
        self.ledger = Ledger(Path(settings.data_dir) / "verified.json")
        self.catalog.excluded.update(self.ledger.quarantined())
        self.integrity = Integrity(self.ledger, self.catalog)
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
        self.containerd_version = version
        logging.getLogger("shoal").addHandler(self.problems)
        log.info(
            "containerd %s, namespace %s, content %s",
            version,
            self.settings.containerd_namespace,
            root,
        )
        keeper_sources: list[Source] = []  # filled once the chain exists
        self.keeper = keeper = Keeper(self.client, _Sources(keeper_sources), on_change=self._resync)
        local = LocalSource(PreheatedStore(self.store, keeper), self.integrity)
        upstream = AnonymousUpstream(self.upstream, self.access)
        sharing = SharedFetches(self.spool, self.router)
        inflight = InFlightSource(sharing)
        peers = SpooledPeers(self.peers, sharing, self.transfer)

        ordered = None
        if self.settings.ordered_streams > 0:
            ordered = OrderedFetches(
                running=self.spool.get,
                needed=sharing.needed,
                upstream=lambda ref, digest: upstream.find(ref, digest, "blob"),
                start=sharing.start,
                streams=self.settings.ordered_streams,
                ungated_below=self.transfer.redirect_min,
            )
        self.ordered = ordered
        designation = Designation(self.router, self._me, ordered.images if ordered else None)

        def fetcher(delegate: bool) -> UpstreamFetcher:
            return UpstreamFetcher(
                upstream, sharing, designation, peers, delegate=delegate, ordered=ordered
            )

        rescuer = fetcher(True)
        peers.rescue = lambda ref, digest: rescuer.rescue(ref, digest, self.peers, self.herd)
        chain = gated_chain(
            local=local,
            inflight=inflight,
            peers=peers,
            fetch_for_containerd=rescuer,
            fetch_for_peers=fetcher(False),
            access=self.access,
            refused=self.refusals,
            tags=TimedTags(TagPolicy(self.settings.tag_policy, upstream)),
            private=self.credentialed,
            denied=upstream.denied,
        )
        keeper_sources.extend(chain.sources)
        # The registry first: bootstrap of other nodes asks it for this node's peer ID.
        app = make_app(
            chain,
            p2p_info=lambda: self.router.node_info().to_json(),
            transfer=self.transfer,
            admission=self.admission,
            recorder=self.recorder,
            posts={HOLD_PATH: lambda request: hold(request, keeper)},
            herd=self.herd,
        )
        await self._serve(app, self.settings.listen, "registry")
        health = health_app(self.ready, self.router)
        add_status_routes(health, self._parts())
        signer = self.signer
        coordinator = Coordinator(
            chain,
            keeper,
            self._me,
            self.router.members,
            sign=lambda method, path: signer.headers(method, path, None, False),
        )
        admin_routes(health, coordinator, keeper)
        await self._serve(health, self.settings.metrics_listen, "metrics")
        await self.router.start()
        self.routing_metrics = metrics.watch_routing(self.router.stats)
        s = self.settings
        scrub = Scrub(
            self.integrity,
            self.client.blob_path,
            ScrubSettings(s.scrub_interval, s.scrub_min_rate, s.scrub_max_rate),
        )
        for work, name in (
            (self.catalog.run(), "catalog"),
            (self.health.run(), "containerd-health"),
            (scrub.run(), "scrub"),
            (keep_saved(self.ledger), "ledger"),
            (self._gauges(), "gauges"),
            (keeper.run(), "preheat"),
        ):
            task = asyncio.create_task(work, name=name)
            task.add_done_callback(_report_death)
            self.tasks.append(task)

    async def _serve(self, app: web.Application, address: str, what: str) -> None:
        runner = RegistryRunner(app, self.limits, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        host, port = split_host_port(address)
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        self.runners.append(runner)
        log.info("%s listening on %s", what, address)

    def _parts(self) -> NodeParts:
        """What the status page shows, as the parts' own accessors."""
        return NodeParts(
            ready=self.ready,
            checks=lambda: {
                "containerd": self.health.ok,
                "catalog synced": self.catalog.synced.is_set(),
                "routing": self.router.ready(),
            },
            node_info=self.router.node_info,
            members=self.router.members,
            advertised=lambda: self.catalog.keys,
            listen=self.settings.listen,
            metrics_listen=self.settings.metrics_listen,
            containerd_version=lambda: self.containerd_version,
            namespace=self.settings.containerd_namespace,
            recorder=self.recorder,
            problems=self.problems,
            preheats=lambda: self.keeper.to_json() if self.keeper else [],
            quarantined=lambda: [
                {"digest": d, "reason": "this node's copy did not match its digest"}
                for d in self.ledger.quarantined()[-50:]
            ],
        )

    def _resync(self) -> None:
        """Advertises (or withdraws) what the preheat keeper changed, now."""

        async def sync() -> None:
            try:
                await self.catalog.sync()
            except Exception as exc:  # the periodic resync retries
                log.warning("catalog sync after a preheat change failed: %s", exc)

        task = asyncio.ensure_future(sync())
        self.tasks.append(task)
        task.add_done_callback(lambda t: self.tasks.remove(t) if t in self.tasks else None)

    async def _gauges(self) -> None:
        while True:
            metrics.PEERS.set(len(self.router.members()))
            metrics.SPOOL_BYTES.set(self.spool.used)
            metrics.SPOOL_FETCHES.set(len(self.spool.fetches))
            await asyncio.sleep(2.0)

    async def _shareable_keys(self, client: ContainerdClient) -> set[str]:
        """What the node holds and may share, with what it keeps for preheats."""
        images = await node_images(client)
        return self.access.update(images + (self.keeper.held() if self.keeper else []))

    async def _committed_shareable(self, digest: str) -> bool:
        """A blob containerd committed before any image names it."""
        if self.access.blob_ok(digest):
            return True  # it reached the node anonymously
        info = await self.client.info(digest)
        return info is not None and self.access.committed_ok(info.labels)

    def _my_id(self) -> str:
        return self.router.node_info().id

    async def _held_locally(self, digest: Digest) -> bool:
        return await self.store.content_size(digest) is not None

    def _me(self) -> Peer | None:
        """This node as its peers know it: the registry port at the host it announces."""
        info = self.router.node_info()
        if not info.id:
            return None
        host, port = split_host_port(self.settings.listen)
        if host in ("0.0.0.0", "::", ""):
            announced = next(filter(None, map(ip_of_multiaddr, info.addrs)), None)
            if announced is not None:
                host = f"[{announced}]" if ":" in announced else announced
        return Peer(info.id, f"{host}:{port}")

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for runner in reversed(self.runners):
            await runner.cleanup()
        if self.routing_metrics is not None:
            metrics.REGISTRY.unregister(self.routing_metrics)
        if self.keeper is not None:
            await self.keeper.close()
        await self.integrity.close()
        if self.ordered is not None:
            await self.ordered.close()
        await self.access.close()
        await self.spool.close()
        await self.upstream.close()
        if self.credentialed is not None:
            await self.credentialed.close()
        await self.peers.close()
        await self.router.stop()
        await self.client.close()
        logging.getLogger("shoal").removeHandler(self.problems)


def _report_death(task: asyncio.Task[None]) -> None:
    """A background task that ends before shutdown is a fault: say so (it would go unseen)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())


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


class _Sources:
    """The chain's sources for containerd, for the preheat keeper (made before the chain)."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources
