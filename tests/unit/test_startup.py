"""Nothing answers 5xx because a part is still starting: before (and while) routing comes up,
a request that needs peers is answered as if no peer had it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal.containerd.model import ContainerdUnavailable
from shoal.health import ContainerdHealth
from shoal.oci.digest import Digest
from shoal.registry.app import make_app
from shoal.sources.chain import SourceChain
from shoal.sources.local import LocalSource
from shoal.sources.peers import PeerSource
from tests.fakes.images import NS
from tests.fakes.signing import signer
from tests.fakes.store import MemoryStore
from tests.unit.libp2p_nodes import libp2p_router


async def test_requests_while_routing_starts_are_misses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    router = libp2p_router(tmp_path / "n", "127.0.0.2", ready_alone=True)
    peers = PeerSource(router, signer=signer())
    app = make_app(SourceChain([LocalSource(MemoryStore()), peers]))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    blob = server.make_url(f"/v2/team/app/blobs/{Digest.of(b'nobody')}")
    tag = server.make_url("/v2/team/app/manifests/v1")
    statuses: set[int] = set()
    try:
        async with aiohttp.ClientSession() as session:

            async def ask() -> None:
                for url in (blob, tag):
                    async with session.get(url, params={"ns": NS}) as resp:
                        statuses.add(resp.status)
                        assert (await resp.json())["errors"][0]["code"].endswith("_UNKNOWN")

            await ask()  # not started at all
            starting = asyncio.ensure_future(router.start())
            while not starting.done():  # and while it starts
                await ask()
            await starting
            await ask()
    finally:
        await server.close()
        await peers.close()
        await router.stop()
    assert statuses == {404}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class Versions:
    def __init__(self) -> None:
        self.down = False

    async def version(self) -> str:
        if self.down:
            raise ContainerdUnavailable("containerd version: UNAVAILABLE: connection refused")
        return "1.6.20"


async def test_containerd_going_away_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    client = Versions()
    health = ContainerdHealth(client)
    with caplog.at_level(logging.INFO, logger="shoal"):
        assert await health.check()
        client.down = True
        for _ in range(5):
            assert not await health.check()
        client.down = False
        assert await health.check()
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "not answering" in caplog.records[0].getMessage()


async def test_a_containerd_that_hangs_is_down() -> None:
    class Hung:
        async def version(self) -> str:
            await asyncio.sleep(3600)
            return ""

    health = ContainerdHealth(Hung(), timeout=0.05)
    assert not await health.check()
    assert not health.ok
