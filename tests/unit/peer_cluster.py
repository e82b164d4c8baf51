"""Nodes of shoal's registry app on loopback, found through an in-memory router (not a test
module): the peer tests build small clusters of real apps and fake holders with it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.fetch.sharing import SharedFetches
from shoal.fetch.spool import Spool
from shoal.herd.serving import Herd
from shoal.registry.app import make_app
from shoal.registry.transfer import PeerTransfer
from shoal.routing import Peer
from shoal.sources.chain import SourceChain
from shoal.sources.download import Deadlines
from shoal.sources.holders import Holders
from shoal.sources.inflight import InFlightSource
from shoal.sources.local import LocalSource
from shoal.sources.peers import PeerSettings, PeerSource
from shoal.sources.spooled import SpooledPeers
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.fakes.signing import admission, signer
from tests.fakes.store import MemoryStore


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.net = MemoryNetwork()
        self.servers: list[TestServer] = []
        self.spools: list[Spool] = []
        self.lookups: list[str] = []
        self.holders: dict[str, Holders] = {}
        self.herds: dict[str, Herd] = {}
        self.routers: list[MemoryRouter] = []

    def net_members(self) -> list[Peer]:
        return [r.peer for r in self.routers]

    async def node(
        self,
        name: str,
        store: MemoryStore | None = None,
        app: web.Application | None = None,
        header_timeout: float = 1.0,
        redirect: bool = False,
        spooled: bool = False,
        local: LocalSource | None = None,
        fanout: int | None = None,
    ) -> tuple[TestServer, MemoryRouter]:
        """A node; it relays peers' bytes itself unless `redirect` (then even small blobs),
        through its own spool with `spooled` (the daemon's default), else streamed."""
        local = local or LocalSource(store or MemoryStore())
        holder: dict[str, MemoryRouter] = {}
        deadlines = Deadlines(header_timeout=header_timeout, silence=0.3, probe_timeout=0.5)
        settings = PeerSettings(hedge_after=0.1, deadlines=deadlines)
        holders = self.holders[name] = Holders()
        herd = None
        if fanout is not None:
            herd = self.herds[name] = Herd(lambda: self.net_members(), fanout, me=lambda: name)
        counting = _Counting(holder, self.lookups)
        peers = PeerSource(counting, settings, holders, signer=signer(name), herd=herd)
        transfer = PeerTransfer(redirect=redirect, redirect_min=0, asked=holders)
        if app is None:
            sources: list = [local, peers]
            if spooled:
                spool = Spool(self.tmp / f"spool-{name}", 1 << 30)
                self.spools.append(spool)
                router = _Late(holder)
                sharing = SharedFetches(spool, router)  # type: ignore[arg-type]
                sources = [local, InFlightSource(sharing), SpooledPeers(peers, sharing, transfer)]
            chain = SourceChain(sources, sources[:2] if spooled else [local])
            app = make_app(chain, transfer=transfer, admission=admission(name), herd=herd)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        router = MemoryRouter(self.net, Peer(name, f"127.0.0.1:{server.port}"))
        holder["r"] = router
        self.routers.append(router)
        await router.start()
        self.servers.append(server)
        return server, router

    async def close(self) -> None:
        for server in self.servers:
            await server.close()
        for spool in self.spools:
            await spool.close()


class _Counting:
    """The node's router, counting lookups (the router is made after the server's port)."""

    def __init__(self, holder: dict[str, MemoryRouter], log: list[str]) -> None:
        self.holder, self.log = holder, log

    def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]:
        self.log.append(key)
        return self.holder["r"].lookup(key, limit)


class _Late:
    """The node's router for its spool's announcements, once it exists."""

    def __init__(self, holder: dict[str, MemoryRouter]) -> None:
        self.holder = holder

    async def advertise(self, keys: object) -> None:
        await self.holder["r"].advertise(keys)  # type: ignore[arg-type]

    async def withdraw(self, keys: object) -> None:
        await self.holder["r"].withdraw(keys)  # type: ignore[arg-type]

    def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]:
        return self.holder["r"].lookup(key, limit)


async def get(
    url: str, headers: dict[str, str] | None = None, *, follow: bool = True, method: str = "GET"
) -> tuple[int, bytes, dict]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, headers=headers or {}, allow_redirects=follow) as resp,
    ):
        return resp.status, await resp.read(), dict(resp.headers)
