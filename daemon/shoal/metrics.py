"""Prometheus metrics. The names are a contract with the Helm chart's dashboard."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "shoal_requests_total",
    "Pull API answers by where the content came from",
    ["source", "kind", "code"],
    registry=REGISTRY,
)
BYTES = Counter(
    "shoal_bytes_served_total", "Body bytes served by source", ["source"], registry=REGISTRY
)
TO_PEERS = Counter(
    "shoal_bytes_to_peers_total",
    "Body bytes served to other nodes (their shoal, or their containerd sent here by a redirect)",
    registry=REGISTRY,
)
DURATION = Histogram(
    "shoal_request_duration_seconds",
    "Time to answer a pull API request (streamed bodies included)",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
PEERS = Gauge("shoal_peers", "Peers in the routing table", registry=REGISTRY)
ADVERTISED = Gauge("shoal_advertised_keys", "Keys this node advertises", registry=REGISTRY)
MISSES = Counter(
    "shoal_misses_total", "Requests no source could answer", ["kind"], registry=REGISTRY
)
VERIFY_FAILURES = Counter(
    "shoal_verify_failures_total",
    "Content whose bytes did not match its digest, by source",
    ["source"],
    registry=REGISTRY,
)


def count(source: str, kind: str, code: int, nbytes: int, *, to_peer: bool = False) -> None:
    REQUESTS.labels(source, kind, str(code)).inc()
    if nbytes:
        BYTES.labels(source).inc(nbytes)
        if to_peer:
            TO_PEERS.inc(nbytes)


def observe(method: str, seconds: float) -> None:
    DURATION.labels(method).observe(seconds)


def render() -> bytes:
    return generate_latest(REGISTRY)
