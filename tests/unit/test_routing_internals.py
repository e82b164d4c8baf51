"""Shoal's patches to py-libp2p land where 0.8.1 keeps the things they change, and a libp2p
that lacks one stops `shoal run` at once, saying which.

These touch private attributes; if a libp2p upgrade moves one, shoal must fail instead of
silently falling back to the stock behaviour (48 h records, /ipfs/kad, 12 inbound streams…).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from shoal.cli import main
from shoal.routing.libp2p.internals import (
    _KAD_MODULES,
    SHOAL_KAD_PROTOCOL,
    TESTED_VERSION,
    apply_process_patches,
    check,
    missing,
    tune_dht,
)


def test_pinned_version() -> None:
    assert importlib.metadata.version("libp2p") == TESTED_VERSION == "0.8.1"


def test_the_pinned_libp2p_has_everything_shoal_patches() -> None:
    assert list(missing()) == []
    check()


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """`shoal run` sets up the process's logging; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _no_buckets(self: Any, *args: Any, **kwargs: Any) -> None:
    self.peers = []  # a constructor that no longer sets `self.buckets`


@pytest.mark.parametrize(
    ("module", "owner", "attribute", "named"),
    [
        (
            "libp2p.kad_dht.provider_store",
            None,
            "PROVIDER_RECORD_EXPIRATION_INTERVAL",
            "libp2p.kad_dht.provider_store.PROVIDER_RECORD_EXPIRATION_INTERVAL",
        ),
        (
            "libp2p.stream_muxer.yamux.yamux",
            "YamuxStream",
            "_auto_tune_and_send_window_update",
            "libp2p.stream_muxer.yamux.yamux.YamuxStream._auto_tune_and_send_window_update",
        ),
        (
            "libp2p.kad_dht.routing_table",
            "RoutingTable",
            "__init__",
            "libp2p.kad_dht.routing_table.RoutingTable.buckets",
        ),
    ],
)
def test_a_libp2p_without_what_shoal_patches_stops_shoal_run_saying_what(
    module: str,
    owner: str | None,
    attribute: str,
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    logging_restored: None,
) -> None:
    target: Any = importlib.import_module(module)
    if owner is not None:
        target = getattr(target, owner)
    if attribute == "__init__":
        monkeypatch.setattr(target, "__init__", _no_buckets)  # an attribute set in __init__
    else:
        monkeypatch.delattr(target, attribute)
    assert list(missing()) == [named]
    code = main(
        ["run", "--data-dir", str(tmp_path), "--containerd-socket", str(tmp_path / "none.sock")]
    )
    assert code == 1
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    errors = [line["msg"] for line in lines if line["level"] == "error"]
    assert errors == [
        f"shoal failed: py-libp2p {TESTED_VERSION} lacks {named}, which shoal patches or reads "
        f"(shoal is tested with libp2p=={TESTED_VERSION})"
    ]
    assert not (tmp_path / "spool").exists()  # it stopped before touching anything


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
