"""Every change shoal makes to py-libp2p's behaviour, in one place.

All of these touch private module globals or attributes of `libp2p==0.8.1` (pinned exactly in
pyproject.toml); `tests/unit/test_routing_patches.py` fails loudly if an upgrade moves them.
The module-level patches are process-wide: every KadDHT in the process speaks shoal's protocol.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

SHOAL_KAD_PROTOCOL = "/shoal/kad/1.0.0"

# Modules that imported `PROTOCOL_ID` by name at import time (routing_table reads it from
# `common` lazily at call time). Checked by the patch test.
_KAD_MODULES = ("common", "kad_dht", "provider_store", "value_store", "peer_routing")

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


def apply_process_patches(
    protocol_id: str = SHOAL_KAD_PROTOCOL,
    record_ttl: float = 30 * 60,
    inbound_read_timeout: float = 10.0,
) -> None:
    """Idempotent; the last call wins (one shoal router per process in production)."""
    from libp2p.custom_types import TProtocol
    from libp2p.kad_dht import common, kad_dht, peer_routing, provider_store, value_store

    modules: dict[str, Any] = {
        "common": common,
        "kad_dht": kad_dht,
        "provider_store": provider_store,
        "value_store": value_store,
        "peer_routing": peer_routing,
    }
    # KadDHT(protocol_prefix=…) is stored but ignored: the ID `/ipfs/kad/1.0.0` is hard-coded in
    # each module. A private ID keeps shoal's DHT apart from any IPFS node on the network.
    for name in _KAD_MODULES:
        modules[name].PROTOCOL_ID = TProtocol(protocol_id)

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


def tune_dht(dht: Any, *, inbound_streams: int, add_provider_per_10s: int) -> None:
    """Per-instance limits: shoal runs the whole fleet, so peers are trusted to be well behaved."""
    # 10 ADD_PROVIDER per 10 s per peer silently dropped records while provide() returned True.
    dht._provider_rate_max = add_provider_per_10s
    dht._provider_rate_window = 10.0
    # 12 concurrent inbound DHT streams reset lookups under modest concurrency (152/200 found).
    dht._inbound_limiter = trio.CapacityLimiter(inbound_streams)


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
