"""Real libp2p routers on loopback addresses, for the routing tests (not a test module)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.routing import Peer, RoutingOptions
from shoal.routing.libp2p.router import Libp2pRouter

REGISTRY_PORT = 30020
# Fast ticks so newcomers get their share quickly; everything else as in production.
TEST_OPTIONS = RoutingOptions(tick_interval=0.2, withdraw_on_stop_timeout=1.0)


def libp2p_router(
    data_dir: Path, host: str, options: RoutingOptions = TEST_OPTIONS, **kwargs: Any
) -> Libp2pRouter:
    return Libp2pRouter(
        data_dir=str(data_dir),
        registry_port=REGISTRY_PORT,
        p2p_listen=f"{host}:0",
        options=options,
        **kwargs,
    )


async def libp2p_cluster(
    tmp_path: Path, count: int, options: RoutingOptions = TEST_OPTIONS, first_host: int = 2
) -> list[Libp2pRouter]:
    """`count` started routers on 127.0.0.<first_host…>, all bootstrapped from the first."""
    routers = [
        libp2p_router(tmp_path / f"n{i}", f"127.0.0.{first_host + i}", options)
        for i in range(count)
    ]
    await asyncio.gather(*(r.start() for r in routers))
    seed = routers[0].node_info().addrs
    assert all(await asyncio.gather(*(r.connect(seed) for r in routers[1:])))
    await wait_for(lambda: all(r.ready() for r in routers))
    return routers


async def stop_all(routers: list[Any]) -> None:
    await asyncio.gather(*(r.stop() for r in routers), return_exceptions=True)


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def found(router: Any, key: str, limit: int = 3) -> list[Peer]:
    return [p async for p in router.lookup(key, limit)]
