"""A designated fetcher may take its patience (20 s) to answer, since it asks upstream first;
one that crashed never answers at all. Past the header deadline it is probed: a crashed one is
given up after about header deadline + probe deadline, a live one is waited for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.oci.digest import Digest
from shoal.oci.names import make_reference
from shoal.registry.protocol import P2P_INFO_PATH
from shoal.routing import Peer
from shoal.sources import peers as peers_module
from shoal.sources.download import Deadlines
from shoal.sources.liveness import Unanswered, while_alive
from shoal.sources.peers import PeerSettings, PeerSource, PeerUnreachable
from tests.fakes.images import NS
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.fakes.signing import signer

REF = make_reference(NS, "team/app", "v1")
BLOB = b"fetched from upstream, slowly"
DIGEST = Digest.of(BLOB)
FAST = Deadlines(header_timeout=0.3, silence=0.3, probe_timeout=0.3)


@dataclass
class Fetcher:
    """A designated fetcher whose answer takes `answer_after` seconds (its upstream is slow);
    `crashed`: it answers nothing, probes neither."""

    answer_after: float
    crashed: bool = False
    probes: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == P2P_INFO_PATH:
            self.probes += 1
            if self.crashed:
                await asyncio.Event().wait()
            return web.json_response({})
        await asyncio.sleep(3600 if self.crashed else self.answer_after)
        return web.Response(body=BLOB, headers={"Content-Length": str(len(BLOB))})


@pytest.fixture
async def serve() -> AsyncIterator[object]:
    servers: list[TestServer] = []

    async def start(fetcher: Fetcher) -> Peer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fetcher.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Peer("fetcher", f"127.0.0.1:{server.port}")

    yield start
    for server in servers:
        await server.close()


def peer_source() -> PeerSource:
    router = MemoryRouter(MemoryNetwork(), Peer("me", "127.0.0.1:1"))
    return PeerSource(router, signer=signer(), settings=PeerSettings(deadlines=FAST))


async def test_a_live_fetcher_is_waited_for_past_the_header_deadline(serve) -> None:  # type: ignore[no-untyped-def]
    fetcher = Fetcher(answer_after=1.5)
    peer = await serve(fetcher)
    peers = peer_source()
    try:
        download = await peers.fetch_at(peer, REF, DIGEST, "blob")
        assert download is not None and download.size == len(BLOB)
        assert fetcher.probes >= 2  # it was asked whether it lives, and it did
    finally:
        await peers.close()


async def test_a_crashed_fetcher_is_given_up_without_waiting_its_patience(  # type: ignore[no-untyped-def]
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Patience a slow upstream might need, far beyond the test's own deadline: only the probe
    # can end the wait in time.
    monkeypatch.setattr(peers_module, "FETCHER_PATIENCE", 3600.0)
    peer = await serve(Fetcher(answer_after=0, crashed=True))
    peers = peer_source()
    try:
        async with asyncio.timeout(30):
            with pytest.raises(PeerUnreachable):
                await peers.fetch_at(peer, REF, DIGEST, "blob")
    finally:
        await peers.close()


async def test_while_alive_stops_at_the_first_failed_probe() -> None:
    probes: list[bool] = []

    async def alive() -> bool:
        probes.append(len(probes) < 2)
        return probes[-1]

    with pytest.raises(Unanswered):
        await while_alive(asyncio.Event().wait(), alive, first=0.01, every=0.01, limit=60)
    assert probes == [True, True, False]
