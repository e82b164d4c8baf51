"""Tuning of the libp2p router, and how its addresses are chosen from the settings."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from shoal.routing.libp2p.internals import SHOAL_KAD_PROTOCOL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingOptions:
    """Defaults measured on a shared 2-core machine (see bench/routing_scale.py)."""

    protocol_id: str = SHOAL_KAD_PROTOCOL
    # Peers a record is stored at: the `replication` closest to the key (Kademlia's k).
    replication: int = 20
    # Provider records expire after `record_ttl`; every key is re-sent every
    # `reannounce_interval` (±10% jitter), so a live record never expires and a dead node's
    # records vanish within one TTL.
    record_ttl: float = 30 * 60
    reannounce_interval: float = 10 * 60
    # Lookup: per-peer deadline (a hung peer costs at most this), peers queried at once, and
    # how long one query may go unanswered before the next closest peer is asked as well.
    lookup_peer_timeout: float = 1.0
    lookup_parallel: int = 3
    lookup_hedge_delay: float = 0.05
    # Queries in flight per node across all lookups (more wait for a slot).
    lookup_max_inflight: int = 32
    # A lookup short of `limit` stops after this many answers that named providers (each
    # holder names all it has), or this many answers in a row that brought no closer peer.
    lookup_enough_answers: int = 3
    lookup_quiet_answers: int = 4
    # While the routing table holds fewer than `replication` peers and no answer names a peer
    # we did not know, every record was sent to every node we know: this many answers settle
    # a lookup (more than one, as a node may have missed an announcement).
    lookup_whole_answers: int = 2
    # Once the table is whole and has held the same peers this long (each had ticks to send
    # this node its records: at connect, to newcomers, after a reconnect, after a failed
    # send), a lookup is answered from this node's own store without asking anyone: a walk
    # would ask peers that store the same records. At the start of a rollout every node
    # looks up every blob while nobody has it yet; under load those walks timed out (16
    # nodes: 1,007 queries; with a 0.25 s hedge 488, 349 of them timed out, each lookup
    # holding its pull up to a second).
    lookup_settled_after: float = 6.0
    # New keys wait this long for more before they go out, as one message per peer: a pull
    # starts its blobs within a few hundred ms, and each message costs every one of up to
    # `replication` peers a few ms of CPU (16 nodes pulling 7 keys each: 1,674 messages, 0.4
    # CPU-s per node; with 0.5 s, 899-942). Peers learn of a blob under way that much later.
    announce_linger: float = 0.5
    # Bulk announce: deadline to open a stream / per frame, targets sent to at once.
    announce_open_timeout: float = 5.0
    announce_frame_timeout: float = 15.0
    announce_parallel: int = 8
    announce_frame_keys: int = 4096
    # Beyond `replication` nodes, a network walk per keyspace region finds each region's
    # closest nodes: "auto" walks only once a routing-table bucket has filled up (before
    # that the table already holds every node), "always" / "never" for tests.
    announce_region_walks: str = "auto"
    # Inbound: concurrent DHT streams (stock 12), ADD_PROVIDER per peer per 10 s (stock 10),
    # and how long an inbound stream may sit idle before it is reset.
    inbound_streams: int = 128
    add_provider_per_10s: int = 100_000
    inbound_read_timeout: float = 10.0
    # Background work: how often peer counts are sampled and newcomers get their share of keys.
    tick_interval: float = 2.0
    # Bootstrap: first retry delay and cap while the routing table is empty; how many
    # discovered peers are dialled at once; how often discovery re-runs to heal partitions.
    bootstrap_retry_min: float = 1.0
    bootstrap_retry_max: float = 30.0
    bootstrap_max_peers: int = 16
    rediscover_interval: float = 5 * 60
    # Best-effort withdrawal of every key on stop (bounded), so peers stop trying this node.
    withdraw_on_stop_timeout: float = 3.0
    # Peers that fail are skipped for this long, doubling up to the max.
    failure_backoff: float = 15.0
    failure_backoff_max: float = 300.0


def split_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, or a bare host when `default_port` is given."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            return host, int(rest[1:])
        if default_port is None:
            raise ValueError(f"no port in {value!r}")
        return host, default_port
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, int(port)
    if default_port is None:
        raise ValueError(f"no port in {value!r}")
    return value, default_port  # a bare IPv4/hostname, or a bare IPv6 address


def is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def default_announce_ip() -> str:
    """The first non-loopback IPv4 address of this machine (then IPv6), else 127.0.0.1."""
    candidates: list[str] = []
    try:
        import ifaddr  # comes with libp2p (via zeroconf); optional

        for adapter in ifaddr.get_adapters():
            for entry in adapter.ips:
                if isinstance(entry.ip, str):
                    candidates.append(entry.ip)
                else:
                    candidates.append(entry.ip[0].split("%")[0])
    except Exception:
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            candidates.append(str(info[4][0]))
    except OSError:
        pass
    usable = []
    for text in candidates:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast):
            usable.append(ip)
    for ip in usable:
        if ip.version == 4:
            return str(ip)
    if usable:
        return str(usable[0])
    log.warning("no non-loopback address found; announcing 127.0.0.1")
    return "127.0.0.1"


def resolve_p2p_addresses(p2p_listen: str, p2p_announce: str) -> tuple[str, int, str, int]:
    """(listen host, listen port, announce ip, announce port) from the two settings.

    The announce address is never unspecified: `p2p_announce` (ip or ip:port) if set, else the
    listen host if it is a concrete address, else the first non-loopback address.
    """
    listen_host, listen_port = split_host_port(p2p_listen)
    if p2p_announce:
        announce_host, announce_port = split_host_port(p2p_announce, listen_port)
    elif not is_unspecified(listen_host):
        announce_host, announce_port = listen_host, listen_port
    else:
        announce_host, announce_port = default_announce_ip(), listen_port
    if is_unspecified(announce_host):
        raise ValueError("p2p_announce must not be an unspecified address (0.0.0.0 / ::)")
    announce_host = (
        socket.gethostbyname(announce_host) if not _is_ip(announce_host) else announce_host
    )
    return listen_host, listen_port, announce_host, announce_port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ip_multiaddr(host: str, port: int) -> str:
    family = "ip6" if ":" in host else "ip4"
    return f"/{family}/{host}/tcp/{port}"


def http_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_psk(path: str) -> str | None:
    """A libp2p private-network key: go-libp2p's swarm.key format or 64 hex characters."""
    if not path:
        return None
    with open(path, encoding="ascii") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    if lines and lines[0].startswith("/key/swarm/psk/"):
        if len(lines) < 3 or lines[1] != "/base16/":
            raise ValueError(f"{path}: only /base16/ swarm keys are supported")
        key = lines[2]
    else:
        key = "".join(lines)
    key = key.lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"{path}: a private-network key is 32 bytes written as 64 hex digits")
    return key
