"""What the libp2p node counts and samples, read by the asyncio side for /metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NodeStats:
    """Samples read by the asyncio side (replaced whole, never mutated there)."""

    routing_table: int = 0
    connected: int = 0
    keys: int = 0
    stored_records: int = 0
    table_settled: int = 0  # 1: lookups are answered from this node's store (see options)
    # (peer ID, IP) of routing-table peers: the cluster members this node knows.
    members: tuple[tuple[str, str], ...] = ()


@dataclass
class Counters:
    announce_streams: int = 0
    announce_failures: int = 0
    records_sent: int = 0
    records_received: int = 0
    lookups: int = 0
    lookup_local_hits: int = 0
    lookup_store_only: int = 0
    lookup_queries: int = 0
    lookup_query_failures: int = 0
    exchange_timeouts: int = 0
    loop_lag_max: float = 0.0
