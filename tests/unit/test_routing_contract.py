"""The Router contract, held by MemoryRouter and by Libp2pRouter (three real nodes on loopback)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal.routing import Peer, Router
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.unit.libp2p_nodes import REGISTRY_PORT, found, libp2p_cluster, stop_all, wait_for


@dataclasses.dataclass
class Trio:
    routers: list[Any]
    address: dict[str, str]  # peer id -> the address lookups must report

    def id(self, i: int) -> str:
        return str(self.routers[i].node_info().id)


@pytest.fixture(params=["memory", "libp2p"])
async def trio_nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Trio]:
    if request.param == "memory":
        net = MemoryNetwork()
        routers: list[Any] = [
            MemoryRouter(net, Peer(f"node{i}", f"10.0.0.{i}:{REGISTRY_PORT}")) for i in range(3)
        ]
        for r in routers:
            await r.start()
        address = {r.peer.id: r.peer.address for r in routers}
    else:
        routers = await libp2p_cluster(tmp_path, 3)
        address = {
            r.node_info().id: f"127.0.0.{i + 2}:{REGISTRY_PORT}" for i, r in enumerate(routers)
        }
    try:
        yield Trio(routers, address)
    finally:
        await stop_all(routers)


def _is_router(router: Router) -> Router:
    return router  # type-checks that both implementations satisfy the protocol


async def test_advertised_key_is_found_from_the_other_nodes(trio_nodes: Trio) -> None:
    a, b, c = (_is_router(r) for r in trio_nodes.routers)
    key = "sha256:" + "1" * 64
    await a.advertise([key])
    for other in (b, c):
        peers = await found(other, key)
        assert [p.id for p in peers] == [trio_nodes.id(0)]
        assert peers[0].address == trio_nodes.address[trio_nodes.id(0)]


async def test_lookup_is_distinct_limited_and_never_self(trio_nodes: Trio) -> None:
    a, b, c = trio_nodes.routers
    key = "registry.example/team/app:v1"
    for r in (a, b, c):
        await r.advertise([key])
        await r.advertise([key])  # idempotent
    assert len(await found(c, key, limit=1)) == 1
    peers = await found(c, key, limit=5)
    assert sorted(p.id for p in peers) == sorted([trio_nodes.id(0), trio_nodes.id(1)])
    assert await found(c, key, limit=0) == []
    alone = "sha256:" + "2" * 64
    await a.advertise([alone])
    assert await found(a, alone) == []


async def test_withdrawn_key_is_no_longer_found(trio_nodes: Trio) -> None:
    a, b, c = trio_nodes.routers
    keep, drop = "sha256:" + "3" * 64, "sha256:" + "4" * 64
    await a.advertise([keep, drop])
    assert await found(b, drop)
    await a.withdraw([drop])
    await a.withdraw(["sha256:" + "5" * 64])  # never advertised: a no-op
    assert await found(b, drop) == []
    assert await found(c, drop) == []
    assert [p.id for p in await found(b, keep)] == [trio_nodes.id(0)]


async def test_unknown_key_finds_nothing_quickly(trio_nodes: Trio) -> None:
    start = time.monotonic()
    assert await found(trio_nodes.routers[1], "sha256:" + "6" * 64) == []
    assert time.monotonic() - start < 1.0


async def test_ready_members_and_identity(trio_nodes: Trio) -> None:
    a, b, c = trio_nodes.routers
    assert all(r.ready() for r in (a, b, c))
    ids = {trio_nodes.id(i) for i in range(3)}
    assert len(ids) == 3
    await wait_for(lambda: {p.id for p in a.members()} == ids - {trio_nodes.id(0)})
    assert all(p.address == trio_nodes.address[p.id] for p in a.members())
