"""Every access shoal makes to py-libp2p's private state, in one place, checked at start.

These touch private module globals and attributes of `libp2p==0.8.1` (pinned exactly in
pyproject.toml). `check()` runs when a router is made: a libp2p that lacks any of them makes
`shoal run` fail with a message naming it, instead of silently falling back to the stock
behaviour (48 h records, /ipfs/kad, 12 inbound streams...). The module-level patches are
process-wide: every KadDHT in the process speaks shoal's protocol. What py-libp2p does wrong
without them is in docs/libp2p.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

SHOAL_KAD_PROTOCOL = "/shoal/kad/1.0.0"
TESTED_VERSION = "0.8.1"

# Modules that imported `PROTOCOL_ID` by name at import time (routing_table reads it from
# `common` lazily at call time).
_KAD_MODULES = ("common", "kad_dht", "provider_store", "value_store", "peer_routing")

# Everything below that must exist: (module, attribute path); a class's attributes set in its
# __init__ are listed as `Class.__init__:attr`, and found in the constructor's source.
_REQUIRED: tuple[tuple[str, str], ...] = (
    *((f"libp2p.kad_dht.{name}", "PROTOCOL_ID") for name in _KAD_MODULES),
    ("libp2p.kad_dht.provider_store", "PROVIDER_RECORD_EXPIRATION_INTERVAL"),
    ("libp2p.kad_dht.provider_store", "ProviderStore.__init__:providers"),
    ("libp2p.kad_dht.kad_dht", "read_varint_prefixed_bytes_limited"),
    ("libp2p.kad_dht.kad_dht", "KadDHT.__init__:_provider_rate_max"),
    ("libp2p.kad_dht.kad_dht", "KadDHT.__init__:_provider_rate_window"),
    ("libp2p.kad_dht.kad_dht", "KadDHT.__init__:_inbound_limiter"),
    ("libp2p.kad_dht.routing_table", "RoutingTable.__init__:buckets"),
    ("libp2p.kad_dht.routing_table", "KBucket.__init__:bucket_size"),
    ("libp2p.host.basic_host", "BasicHost.get_addrs"),
    ("libp2p.stream_muxer.yamux.yamux", "Yamux._write_frame"),
    ("libp2p.stream_muxer.yamux.yamux", "Yamux.__init__:secured_conn"),
    ("libp2p.stream_muxer.yamux.yamux", "YamuxStream._auto_tune_and_send_window_update"),
    ("libp2p.stream_muxer.yamux.yamux", "YamuxStream.send_window_update"),
    ("libp2p.stream_muxer.yamux.yamux", "YamuxStream.__init__:window_lock"),
    ("libp2p.stream_muxer.yamux.yamux", "YamuxStream.__init__:_pending_recv_release"),
    ("libp2p.stream_muxer.yamux.yamux", "YamuxStream.__init__:target_recv_window"),
    ("libp2p.stream_muxer.yamux.yamux", "YamuxStream.__init__:recv_window"),
)

# Loggers that are noisy in normal operation: the DHT handler warns "Failed to read DHT message"
# on every request a client closes, and failed dials log multi-line tracebacks.
_NOISY = (
    "libp2p.kad_dht",
    "libp2p.network",
    "libp2p.host",
    "libp2p.transport",
    "libp2p.stream_muxer",
    "libp2p.protocol_muxer",
    "libp2p.security",
    "libp2p.identity",
)

_applied: dict[str, Any] = {}


class Libp2pMismatch(RuntimeError):
    """The installed py-libp2p lacks something shoal patches or reads."""


def _present(module_name: str, path: str) -> bool:
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        return False
    where, _, assigned = path.partition(":")
    for part in where.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    if not assigned:
        return True
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return False
    return re.search(rf"\bself\.{re.escape(assigned)}\s*[:=]", source) is not None


def missing() -> Iterator[str]:
    """What of `_REQUIRED` the installed py-libp2p lacks, as `module.attribute` names."""
    for module_name, path in _REQUIRED:
        if not _present(module_name, path):
            where, _, assigned = path.partition(":")
            yield f"{module_name}.{where.removesuffix('.__init__')}" + (
                f".{assigned}" if assigned else ""
            )


def check() -> None:
    """Raises Libp2pMismatch, naming the first missing attribute, unless all are there."""
    for name in missing():
        try:
            version = importlib.metadata.version("libp2p")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed)"
        raise Libp2pMismatch(
            f"py-libp2p {version} lacks {name}, which shoal patches or reads "
            f"(shoal is tested with libp2p=={TESTED_VERSION})"
        )


# -- process-wide patches ---------------------------------------------------------------------


def apply_process_patches(
    protocol_id: str = SHOAL_KAD_PROTOCOL,
    record_ttl: float = 30 * 60,
    inbound_read_timeout: float = 10.0,
) -> None:
    """Idempotent; the last call wins (one shoal router per process in production)."""
    from libp2p.custom_types import TProtocol
    from libp2p.kad_dht import kad_dht, provider_store

    # KadDHT(protocol_prefix=…) is stored but ignored: the ID `/ipfs/kad/1.0.0` is hard-coded in
    # each module. A private ID keeps shoal's DHT apart from any IPFS node on the network.
    for name in _KAD_MODULES:
        module: Any = importlib.import_module(f"libp2p.kad_dht.{name}")
        module.PROTOCOL_ID = TProtocol(protocol_id)

    # Provider records live 48 h and are read from this global at call time. Shoal re-announces
    # every few minutes, so a dead node's records must vanish within tens of minutes.
    provider_store.PROVIDER_RECORD_EXPIRATION_INTERVAL = record_ttl  # type: ignore[assignment]

    # The inbound DHT handler reads with no timeout: idle streams hold the inbound limiter's
    # slots forever. The name is only used by that handler in kad_dht.py; a timed-out read
    # raises inside its `except Exception` branch, which resets the stream.
    original = _applied.setdefault("read", kad_dht.read_varint_prefixed_bytes_limited)
    kad_dht.read_varint_prefixed_bytes_limited = _with_timeout(original, inbound_read_timeout)  # type: ignore[assignment]
    _applied["protocol_id"] = protocol_id
    shield_yamux_writes()
    batch_yamux_window_updates()
    quiet_libp2p_logging()


def shield_yamux_writes(stall_timeout: float = 30.0) -> None:
    """Make every yamux frame write uncancellable (bounded by `stall_timeout`).

    All of a connection's frames go through `Yamux._write_frame`. Noise encrypts (advancing its
    nonce) before the bytes reach the socket, so a cancellation landing in between, from any
    timeout anywhere (py-libp2p's own included), desynchronises the connection: every later
    stream on it fails (`MultiselectClient handshake: read failed`) until it drops. Shielded,
    a frame is written whole or the connection is closed.
    """
    from libp2p.stream_muxer.exceptions import MuxedConnUnavailable
    from libp2p.stream_muxer.yamux.yamux import Yamux

    original = _applied.setdefault("write_frame", Yamux._write_frame)

    async def _write_frame(self: Any, data: bytes) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + stall_timeout) as scope:
            await original(self, data)
        if scope.cancelled_caught:
            # Half a frame may be on the wire: this connection cannot be trusted any more.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
                try:
                    await self.secured_conn.close()
                except Exception:
                    pass
            raise MuxedConnUnavailable(f"yamux write stalled for {stall_timeout}s")

    Yamux._write_frame = _write_frame  # type: ignore[method-assign]


def _with_timeout(
    fn: Callable[..., Awaitable[bytes]], seconds: float
) -> Callable[..., Awaitable[bytes]]:
    async def timed(reader: Any, max_length: int) -> bytes:
        with trio.fail_after(seconds):
            return await fn(reader, max_length)

    return timed


def batch_yamux_window_updates() -> None:
    """Send a yamux WINDOW_UPDATE once half the receive window is consumed, as go-yamux does.

    py-libp2p's auto-tuning sends one after nearly every read, and the DHT reads its varint
    prefixes a byte at a time: 13 of the 25 frames of a GET_PROVIDERS exchange were window
    updates, each a Noise message and a socket write. Shoal's streams carry small messages,
    so window auto-growth (for bulk throughput) is not needed.
    """
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    _applied.setdefault("window_update", YamuxStream._auto_tune_and_send_window_update)

    async def _auto_tune_and_send_window_update(self: Any, *, bytes_read: int = 0) -> None:
        increment = 0
        async with self.window_lock:
            self._pending_recv_release += bytes_read
            if self._pending_recv_release >= self.target_recv_window // 2:
                increment = self._pending_recv_release
                self.recv_window += increment
                self._pending_recv_release = 0
        if increment:
            await self.send_window_update(increment, skip_lock=True)

    YamuxStream._auto_tune_and_send_window_update = _auto_tune_and_send_window_update  # type: ignore[method-assign]


def quiet_libp2p_logging(level: int = logging.ERROR) -> None:
    """Re-attach libp2p's loggers to the app's logging config and silence per-request noise.

    Importing libp2p sets `libp2p` to propagate=False with no handler, so its warnings bypass the
    app's handlers and reach stderr through logging.lastResort. LIBP2P_DEBUG keeps libp2p's own
    setup for debugging.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return
    root = logging.getLogger("libp2p")
    root.handlers.clear()
    root.propagate = True
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # libp2p sets this one to INFO explicitly.
    logging.getLogger("libp2p.network.auto_connector").setLevel(logging.NOTSET)


# -- per-instance state -----------------------------------------------------------------------


def tune_dht(dht: Any, *, inbound_streams: int, add_provider_per_10s: int) -> None:
    """Per-instance limits: shoal runs the whole fleet, so peers are trusted to be well behaved."""
    # 10 ADD_PROVIDER per 10 s per peer silently dropped records while provide() returned True.
    dht._provider_rate_max = add_provider_per_10s
    dht._provider_rate_window = 10.0
    # 12 concurrent inbound DHT streams reset lookups under modest concurrency (152/200 found).
    dht._inbound_limiter = trio.CapacityLimiter(inbound_streams)


def provider_records(dht: Any) -> dict[bytes, dict[str, Any]]:
    """The DHT's provider store itself (key -> peer ID -> ProviderRecord), written directly:
    records arrive in bulk (`shoal.routing.wire`), not one ADD_PROVIDER at a time."""
    records: dict[bytes, dict[str, Any]] = dht.provider_store.providers
    return records


def buckets_ever_filled(dht: Any) -> bool:
    """Whether any routing-table bucket is full (then the table no longer holds every node)."""
    return any(b.size() >= b.bucket_size for b in dht.routing_table.buckets)


def fix_addrs(host: Any) -> None:
    """Answers get_addrs() from a copy made now. The announced address is fixed once listening;
    BasicHost.get_addrs rebuilds it (multiaddr parsing, ~0.6 ms) on every call, and the DHT calls
    it for every response it signs."""
    addrs = host.get_addrs()
    host.get_addrs = lambda: list(addrs)
