"""Shoal's patches to py-libp2p land where 0.8.1 keeps the things they change.

These touch private attributes; if a libp2p upgrade moves one, this fails instead of shoal
silently falling back to the stock behaviour (48 h records, /ipfs/kad, 12 inbound streams…).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
from typing import Any

import trio

from shoal.routing.patches import (
    _KAD_MODULES,
    SHOAL_KAD_PROTOCOL,
    apply_process_patches,
    tune_dht,
)


def test_pinned_version() -> None:
    assert importlib.metadata.version("libp2p") == "0.8.1"


def test_protocol_ttl_read_timeout_and_yamux_patches_are_in_place() -> None:
    from libp2p.kad_dht import common, kad_dht, peer_routing, provider_store, value_store
    from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

    modules: dict[str, Any] = {
        "common": common,
        "kad_dht": kad_dht,
        "provider_store": provider_store,
        "value_store": value_store,
        "peer_routing": peer_routing,
    }
    # Every module that uses the protocol ID imported it by name: all are patched.
    assert set(_KAD_MODULES) == set(modules)
    apply_process_patches(record_ttl=123.0, inbound_read_timeout=4.0)
    for name in _KAD_MODULES:
        assert modules[name].PROTOCOL_ID == SHOAL_KAD_PROTOCOL
    assert provider_store.PROVIDER_RECORD_EXPIRATION_INTERVAL == 123.0
    assert kad_dht.read_varint_prefixed_bytes_limited.__qualname__.startswith("_with_timeout")
    patched = Yamux._write_frame, YamuxStream._auto_tune_and_send_window_update
    assert patched[0].__qualname__.startswith("shield_yamux_writes")
    assert patched[1].__qualname__.startswith("batch_yamux_window_updates")
    apply_process_patches()  # idempotent: wraps the originals again, never a wrapper
    assert provider_store.PROVIDER_RECORD_EXPIRATION_INTERVAL == 30 * 60
    assert Yamux._write_frame.__qualname__.startswith("shield_yamux_writes")


def test_dht_limits_are_raised_on_the_instance() -> None:
    from libp2p.kad_dht.kad_dht import KadDHT

    class Fake:
        _provider_rate_max = 10
        _provider_rate_window = 10.0
        _inbound_limiter = trio.CapacityLimiter(12)

    # The attributes exist on a real KadDHT (set in __init__): checked by name in its source.
    source = inspect.getsource(KadDHT.__init__)
    for attr in ("_provider_rate_max", "_provider_rate_window", "_inbound_limiter"):
        assert f"self.{attr}" in source
    fake = Fake()
    tune_dht(fake, inbound_streams=99, add_provider_per_10s=5000)
    assert fake._provider_rate_max == 5000 and fake._inbound_limiter.total_tokens == 99


async def test_yamux_frame_writes_survive_cancellation() -> None:
    """A cancelled frame write still writes the whole frame (the connection stays in sync)."""
    from libp2p.stream_muxer.yamux.yamux import Yamux

    apply_process_patches()
    written: list[bytes] = []

    class Conn:
        async def write(self, data: bytes) -> None:
            await trio.sleep(0.05)
            written.append(data)

    class FakeYamux:
        _write_lock = trio.Lock()
        secured_conn = Conn()

    async def run() -> None:
        with trio.move_on_after(0.01):
            await Yamux._write_frame(FakeYamux(), b"frame")  # type: ignore[arg-type]

    await asyncio.to_thread(trio.run, run)
    assert written == [b"frame"]
