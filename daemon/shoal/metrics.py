"""Prometheus metrics. The names are a contract with the Helm chart's dashboard."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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
REFUSALS = Counter(
    "shoal_refusals_total",
    "Requests refused (401/403) and content withheld (private, or of unknown status), by reason",
    ["reason"],
    registry=REGISTRY,
)
CONTENT_STATUS = Gauge(
    "shoal_images_by_status",
    "Images this node holds, by whether their registry serves them anonymously",
    ["status"],
    registry=REGISTRY,
)
VERIFY_FAILURES = Counter(
    "shoal_verify_failures_total",
    "Content whose bytes did not match its digest, by source",
    ["source"],
    registry=REGISTRY,
)
UPSTREAM_CIRCUITS_OPEN = Gauge(
    "shoal_upstream_circuits_open",
    "Upstream origins (registries, token realms, storage) not asked because they stopped answering",
    registry=REGISTRY,
)
REJECTED = Counter(
    "shoal_rejected_requests_total",
    "Requests and connections refused before any route ran, by reason",
    ["reason"],
    registry=REGISTRY,
)
CUT = Counter(
    "shoal_connections_cut_total",
    "Client connections closed by shoal's deadlines, by which deadline",
    ["deadline"],
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "shoal_quarantined_total",
    "Digests this node quarantined because its own copy did not match, by what found it",
    ["found_by"],
    registry=REGISTRY,
)
QUARANTINED_DIGESTS = Gauge(
    "shoal_quarantined_digests", "Digests this node holds but will not serve", registry=REGISTRY
)
VERIFIED_FILES = Gauge(
    "shoal_verified_files",
    "Files of the node's content store on record as hashed in full and matching",
    registry=REGISTRY,
)
SCRUBBED_BYTES = Counter(
    "shoal_scrubbed_bytes_total", "Bytes the background scrub re-hashed", registry=REGISTRY
)
HOLDERS_ABANDONED = Counter(
    "shoal_peer_holders_abandoned_total",
    "Peer downloads moved to another holder, by why (silent, failed, mismatch)",
    ["reason"],
    registry=REGISTRY,
)


# Per registry (`ns`) and source, counted once per answer by shoal.observe.middleware.
HERD_STREAMS = Gauge(
    "shoal_herd_streams",
    "Blob streams this node sends to peers now under the herd's fan-out bound",
    registry=REGISTRY,
)
HERD_REFUSED = Counter(
    "shoal_herd_refused_total",
    "Peer requests answered 429 by the herd bound, by why (full: referred onward; loop)",
    ["reason"],
    registry=REGISTRY,
)
HERD_FOLLOWED = Counter(
    "shoal_herd_referrals_followed_total",
    "Referrals this node followed to another peer, and re-attaches asking for a spare slot",
    ["kind"],
    registry=REGISTRY,
)
PULLS = Counter(
    "shoal_pulls_total",
    "Manifests and blobs answered, by registry (`ns`), source and kind",
    ["registry", "source", "kind"],
    registry=REGISTRY,
)
PULL_BYTES = Counter(
    "shoal_pull_bytes_total",
    "Body bytes answered by registry and source (a redirect counts the blob the client fetched)",
    ["registry", "source"],
    registry=REGISTRY,
)
STREAMS = Gauge(
    "shoal_inflight_streams", "GET answers of the pull API under way right now", registry=REGISTRY
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOOKUP_DURATION = Histogram(
    "shoal_lookup_duration_seconds",
    "Time to ask the routing layer which peers hold a key",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
RESOLVE_DURATION = Histogram(
    "shoal_resolve_duration_seconds",
    "Time to decide what a tag means (the tag policy), by whether it was found",
    ["result"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "shoal_upstream_errors_total",
    "Upstream answers and attempts that failed (retried or not), by registry host and reason",
    ["registry", "reason"],
    registry=REGISTRY,
)
UPSTREAM_THROTTLED = Counter(
    "shoal_upstream_throttled_total",
    "429 Too Many Requests answers from upstream registries",
    ["registry"],
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "shoal_spool_bytes", "Bytes of blobs in the spool (fetching or kept)", registry=REGISTRY
)
SPOOL_FETCHES = Gauge(
    "shoal_spool_fetches", "Blobs in the spool (fetching or kept)", registry=REGISTRY
)
PREHEATS = Gauge(
    "shoal_preheats", "Images this node keeps for a preheat, by state", ["state"], registry=REGISTRY
)


# The router's stats: help texts, and which are levels rather than running totals.
ROUTING_HELP = {
    "routing_table_peers": "Peers in the DHT routing table",
    "connected_peers": "Peers with an open libp2p connection",
    "advertised_keys": "Keys this node announces",
    "stored_records": "Provider records this node stores for others",
    "table_settled": "1 while lookups are answered from this node's own store (table settled)",
    "loop_lag_max_seconds": "Longest the routing thread's loop woke up late",
    "announce_streams": "Announcement exchanges sent",
    "announce_failures": "Announcement exchanges that failed",
    "records_sent": "Provider records sent in announcements",
    "records_received": "Provider records accepted from peers",
    "lookups": "Provider lookups started",
    "lookup_local_hits": "Lookups answered from this node's own record store",
    "lookup_store_only": "Lookups answered from this node's store alone (its table settled)",
    "lookup_queries": "GET_PROVIDERS queries sent to peers",
    "lookup_query_failures": "Queries to peers (lookups, refreshes) that failed or timed out",
    "exchange_timeouts": "Routing exchanges cut off by their deadline",
}
ROUTING_GAUGES = frozenset(
    {
        "routing_table_peers",
        "connected_peers",
        "advertised_keys",
        "stored_records",
        "table_settled",
        "loop_lag_max_seconds",
    }
)


class RoutingCollector:
    """Exposes the router's stats as `shoal_routing_*`, read at scrape time (the router keeps
    plain counters in its own thread; copying them on every change would cost more)."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for name, value in sorted(self.stats().items()):
            text = ROUTING_HELP.get(name, name.replace("_", " "))
            family = GaugeMetricFamily if name in ROUTING_GAUGES else CounterMetricFamily
            yield family(f"shoal_routing_{name}", text, value=value)


def watch_routing(stats: Callable[[], dict[str, float]]) -> RoutingCollector:
    """Registers the router's stats for /metrics; returns the collector for unregistering."""
    collector = RoutingCollector(stats)
    REGISTRY.register(collector)
    return collector


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
