"""The router's stats on /metrics: read at scrape time, counters as *_total, gone on unregister."""

from __future__ import annotations

from shoal import metrics


def _lines(prefix: str) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_routing_stats_are_read_at_each_scrape_and_removed_on_unregister() -> None:
    stats = {"lookups": 3, "connected_peers": 2, "loop_lag_max_seconds": 0.25}
    collector = metrics.watch_routing(lambda: dict(stats))
    try:
        assert _lines("shoal_routing_") == {
            "shoal_routing_connected_peers": 2.0,
            "shoal_routing_lookups_total": 3.0,
            "shoal_routing_loop_lag_max_seconds": 0.25,
        }
        stats["lookups"] = 7
        assert _lines("shoal_routing_lookups")["shoal_routing_lookups_total"] == 7.0
        text = metrics.render().decode()
        assert "# TYPE shoal_routing_lookups_total counter" in text
        assert "# TYPE shoal_routing_connected_peers gauge" in text
    finally:
        metrics.REGISTRY.unregister(collector)
    assert _lines("shoal_routing_") == {}


async def test_debug_providers_answers_503_until_routing_is_ready() -> None:
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from shoal.health import health_app
    from shoal.routing import Peer
    from tests.fakes.router import MemoryNetwork, MemoryRouter

    net = MemoryNetwork()
    me, other = Peer("me", "10.0.0.1:30020"), Peer("other", "10.0.0.2:30020")
    router, holder = MemoryRouter(net, me), MemoryRouter(net, other)
    server = TestServer(health_app(lambda: True, router), host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as session:
            url = server.make_url("/debug/providers")
            async with session.get(url, params={"key": "sha256:" + "a" * 64}) as resp:
                assert resp.status == 503  # not started: no traceback, no 500
            await router.start()
            await holder.start()
            await holder.advertise(["sha256:" + "a" * 64])
            async with session.get(url, params={"key": "sha256:" + "a" * 64}) as resp:
                assert resp.status == 200
                assert (await resp.json())["providers"] == [
                    {"id": "other", "address": "10.0.0.2:30020"}
                ]
    finally:
        await server.close()
