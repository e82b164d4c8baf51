"""Finding the first peers: static, DNS and Kubernetes discovery, the /_shoal/p2p step."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.config import Settings
from shoal.registry.protocol import P2P_INFO_PATH
from shoal.routing import NodeInfo, make_router
from shoal.routing.bootstrap import (
    DnsDiscovery,
    KubernetesDiscovery,
    StaticDiscovery,
    fetch_node_info,
    info_to_addrs,
    make_discovery,
    pod_ips,
)
from shoal.routing.libp2p.router import Libp2pRouter
from tests.unit.libp2p_nodes import (
    REGISTRY_PORT,
    TEST_OPTIONS,
    libp2p_router,
    stop_all,
    wait_for,
)

PID = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"


def test_node_info_becomes_dialable_addresses() -> None:
    info = NodeInfo(PID, ("/ip4/10.0.0.1/tcp/30022", f"/ip4/10.0.0.1/tcp/1/p2p/{PID}"))
    assert info_to_addrs(info.to_json()) == [
        f"/ip4/10.0.0.1/tcp/30022/p2p/{PID}",
        f"/ip4/10.0.0.1/tcp/1/p2p/{PID}",
    ]
    assert info_to_addrs({"id": PID, "addrs": ["junk", 5]}) == []
    for bad in ({}, {"id": 5}, {"id": PID, "addrs": "x"}, []):
        with pytest.raises(ValueError):
            info_to_addrs(bad)


async def test_fetch_node_info_from_the_registry_endpoint() -> None:
    app = web.Application()

    async def p2p(_: web.Request) -> web.Response:
        return web.json_response(NodeInfo(PID, ("/ip4/127.0.0.1/tcp/4001",)).to_json())

    app.router.add_get(P2P_INFO_PATH, p2p)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert await fetch_node_info("127.0.0.1", server.port) == [
            f"/ip4/127.0.0.1/tcp/4001/p2p/{PID}"
        ]
    finally:
        await server.close()


class FakeFetch:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, ip: str, port: int) -> list[str]:
        self.asked.append((ip, port))
        if ip not in self.answers:
            raise OSError("connection refused")
        return self.answers[ip]


async def test_static_uses_p2p_addresses_as_they_are_and_asks_for_the_rest() -> None:
    fetch = FakeFetch({"10.0.0.2": [f"/ip4/10.0.0.2/tcp/30022/p2p/{PID}"]})
    ready = f"/ip4/10.0.0.1/tcp/30022/p2p/{PID}"
    static = StaticDiscovery(
        [ready, "/ip4/10.0.0.2/tcp/30022", "/ip4/10.0.0.3/tcp/30022"], REGISTRY_PORT, fetch
    )
    assert await static.discover() == [ready, f"/ip4/10.0.0.2/tcp/30022/p2p/{PID}"]
    assert sorted(fetch.asked) == [("10.0.0.2", REGISTRY_PORT), ("10.0.0.3", REGISTRY_PORT)]


async def test_dns_resolves_the_name_and_asks_each_address() -> None:
    fetch = FakeFetch({"127.0.0.1": [f"/ip4/127.0.0.1/tcp/1/p2p/{PID}"]})
    dns = DnsDiscovery("localhost", REGISTRY_PORT, fetch)
    assert "127.0.0.1" in await dns.resolve()
    assert await dns.discover() == [f"/ip4/127.0.0.1/tcp/1/p2p/{PID}"]
    assert await DnsDiscovery("no-such-name.invalid", 1, fetch).discover() == []


def _pod(ip: str | None, phase: str) -> Any:
    return SimpleNamespace(status=SimpleNamespace(pod_ip=ip, phase=phase))


async def test_kubernetes_lists_running_pods_and_asks_them() -> None:
    assert pod_ips(
        [_pod("10.1.0.1", "Running"), _pod("10.1.0.2", "Pending"), _pod(None, "Running")]
    ) == ["10.1.0.1"]
    calls: list[tuple[str, str]] = []

    def list_ips(namespace: str, selector: str) -> list[str]:
        calls.append((namespace, selector))
        return ["10.1.0.1", "10.1.0.9"]

    fetch = FakeFetch({"10.1.0.1": [f"/ip4/10.1.0.1/tcp/30022/p2p/{PID}"]})
    k8s = KubernetesDiscovery("shoal", "app=shoal", REGISTRY_PORT, fetch, list_ips)
    assert await k8s.discover() == [f"/ip4/10.1.0.1/tcp/30022/p2p/{PID}"]
    assert calls == [("shoal", "app=shoal")]

    def broken(namespace: str, selector: str) -> list[str]:
        raise RuntimeError("forbidden")

    assert await KubernetesDiscovery("shoal", "x", 1, fetch, broken).discover() == []


def test_discovery_from_settings(tmp_path: Path) -> None:
    def settings(**kw: Any) -> Settings:
        return Settings.defaults(data_dir=str(tmp_path), **kw)

    assert make_discovery(settings(bootstrap="none"), 1) is None
    assert isinstance(make_discovery(settings(bootstrap="static"), 1), StaticDiscovery)
    assert isinstance(make_discovery(settings(bootstrap="dns", bootstrap_dns="x"), 1), DnsDiscovery)
    k8s = make_discovery(settings(bootstrap="kubernetes", bootstrap_k8s_namespace="ns"), 1)
    assert isinstance(k8s, KubernetesDiscovery)
    with pytest.raises(ValueError):
        make_discovery(settings(bootstrap="dns"), 1)


class ListDiscovery:
    """Discovery whose answer the test changes."""

    def __init__(self, addrs: list[str]) -> None:
        self.addrs = addrs
        self.calls = 0

    async def discover(self) -> list[str]:
        self.calls += 1
        return list(self.addrs)


async def test_bootstraps_on_its_own_and_again_when_alone(tmp_path: Path) -> None:
    a = libp2p_router(tmp_path / "a", "127.0.0.2")
    c = libp2p_router(tmp_path / "c", "127.0.0.4")
    await asyncio.gather(a.start(), c.start())
    discovery = ListDiscovery(list(a.node_info().addrs))
    b = Libp2pRouter(
        data_dir=str(tmp_path / "b"),
        registry_port=REGISTRY_PORT,
        p2p_listen="127.0.0.3:0",
        discovery=discovery,
        options=TEST_OPTIONS,
    )
    await b.start()
    try:
        await wait_for(lambda: b.ready() and {p.id for p in b.members()} == {a.node_info().id})
        discovery.addrs = list(c.node_info().addrs) + list(b.node_info().addrs)  # b skips itself
        await a.stop()  # b is alone now: it must find someone else
        await wait_for(lambda: c.node_info().id in {p.id for p in b.members()}, timeout=15)
        await wait_for(b.ready)
    finally:
        await stop_all([a, b, c])


async def test_ready_alone_and_factory(tmp_path: Path) -> None:
    lonely = make_router(
        Settings.defaults(data_dir=str(tmp_path / "x"), p2p_listen="127.0.0.5:0", ready_alone=True),
        REGISTRY_PORT,
        TEST_OPTIONS,
    )
    seed = libp2p_router(tmp_path / "seed", "127.0.0.2")
    await asyncio.gather(lonely.start(), seed.start())
    joiner = make_router(
        Settings.defaults(
            data_dir=str(tmp_path / "y"),
            p2p_listen="127.0.0.6:0",
            bootstrap="static",
            bootstrap_peers=list(seed.node_info().addrs),
        ),
        REGISTRY_PORT,
        TEST_OPTIONS,
    )
    try:
        assert isinstance(lonely, Libp2pRouter) and lonely.ready()
        assert not seed.ready()  # nobody yet, and not configured to run alone
        await joiner.start()
        await wait_for(lambda: joiner.ready() and seed.ready())
    finally:
        await stop_all([lonely, seed, joiner])
