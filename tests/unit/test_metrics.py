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
