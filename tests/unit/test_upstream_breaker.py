"""Circuit breakers: a registry that stopped answering is not asked again for a while, and
misses and tags are answered at once meanwhile."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shoal.content.model import Descriptor, SourceKind
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.sources.tags import TagPolicy
from shoal.upstream import Timeouts, UpstreamUnavailable
from shoal.upstream.breaker import BreakerPolicy, Breakers, CircuitOpen, State
from tests.fakes.registries import Servers, stall, status
from tests.fakes.upstream import Clock, add_image, read_all, ref, source

ORIGIN = ("https", "registry.example", 443)
HUNG = Timeouts(connect=1, first_byte=0.2, read=5, operation=10)


def _breaker(clock: Clock, failures: int = 3, cooldown: float = 10.0):
    return Breakers(BreakerPolicy(failures=failures, cooldown=cooldown), clock=clock).of(ORIGIN)


def test_consecutive_failures_open_and_a_success_resets_the_count() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    for _ in range(2):
        breaker.failed(breaker.admit(), "timeout")
    breaker.succeeded(breaker.admit())  # not consecutive any more
    for _ in range(2):
        breaker.failed(breaker.admit(), "timeout")
    assert breaker.state is State.CLOSED
    breaker.failed(breaker.admit(), "timeout")
    assert breaker.state is State.OPEN
    with pytest.raises(CircuitOpen):
        breaker.admit()


def test_half_open_lets_one_probe_through_and_its_verdict_decides() -> None:
    clock = Clock()
    breaker = _breaker(clock, failures=1, cooldown=10)
    breaker.failed(breaker.admit(), "refused")
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 0.1
    probe = breaker.admit()
    assert breaker.state is State.HALF_OPEN
    with pytest.raises(CircuitOpen):  # one probe at a time
        breaker.admit()
    breaker.failed(probe, "timeout")
    assert breaker.state is State.OPEN
    clock.now += 10  # the cooldown doubled after a failed probe
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 10
    breaker.succeeded(breaker.admit())
    assert breaker.state is State.CLOSED
    breaker.admit()


def test_an_abandoned_probe_lets_the_next_one_go() -> None:
    clock = Clock()
    breaker = _breaker(clock, failures=1)
    breaker.failed(breaker.admit(), "refused")
    clock.now += 10
    breaker.abandoned(breaker.admit())  # its request was cancelled: no verdict
    breaker.succeeded(breaker.admit())
    assert breaker.state is State.CLOSED


def test_one_log_line_per_state_change(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    breaker = _breaker(clock, failures=2)
    with caplog.at_level(logging.INFO, logger="shoal.upstream"):
        for _ in range(10):
            try:
                breaker.failed(breaker.admit(), "timeout")
            except CircuitOpen:
                pass
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "closed -> open" in caplog.records[0].getMessage()


async def test_a_hung_registry_is_asked_until_its_breaker_opens(servers: Servers) -> None:
    clock = Clock()
    reg = await servers.registry()
    image = add_image(reg)
    reg.faults = [stall(servers.release)] * 10
    async with source(reg, timeouts=HUNG, clock=clock, breaker=BreakerPolicy(failures=2)) as src:
        for _ in range(2):
            with pytest.raises(UpstreamUnavailable):
                await src.lookup(ref(reg, "v2"))
        asked = len(reg.seen)
        # Open: no connection at all, for tags and for content.
        with pytest.raises(CircuitOpen):
            await src.lookup(ref(reg, "v3"))
        assert await src.find(ref(reg), image.layer_digest, "blob") is None
        assert await src.manifest(ref(reg), image.digest) is None
        assert len(reg.seen) == asked == 2
        # After the cooldown one probe goes out; the registry answers again and all is well.
        reg.faults = []
        clock.now += 10
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None and await read_all(blob) == image.layer
        desc = await src.lookup(ref(reg))
        assert desc is not None and desc.digest == image.digest


async def test_5xx_outages_count_and_other_answers_do_not(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)
    async with source(reg, breaker=BreakerPolicy(failures=3)) as src:
        reg.faults = [status(404)] * 4
        for tag in ("a", "b", "c", "d"):
            assert await src.lookup(ref(reg, tag)) is None  # answers: the breaker stays closed
        reg.faults = [status(503)] * 3  # one lookup's three tries
        with pytest.raises(UpstreamUnavailable):
            await src.lookup(ref(reg, "e"))
        with pytest.raises(CircuitOpen):
            await src.lookup(ref(reg, "f"))


async def test_waiting_for_a_pooled_connection_is_not_the_registrys_silence(
    servers: Servers,
) -> None:
    """With one connection per host, a HEAD queued behind a slow download waits longer than
    the answer deadline; the registry answered everything in time, so nothing fails."""
    release = asyncio.Event()
    reg = await servers.registry(cuts=[1000], stall_blob=release)
    image = add_image(reg)
    async with source(reg, timeouts=HUNG) as src:
        src.transport._limits = (1, 1)  # one connection to the registry, made on first use
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
        chunks = blob.open(0, blob.size - 1)  # a range: each chunk as it comes
        assert await anext(chunks)  # the download holds the only connection, then stalls
        head = asyncio.ensure_future(src.lookup(ref(reg)))
        await asyncio.sleep(0.5)  # more than HUNG.first_byte in the pool's queue
        assert not head.done()
        release.set()
        await chunks.aclose()
        desc = await head
        assert desc is not None and desc.digest == image.digest


class _Cluster:
    name = SourceKind.PEER

    def __init__(self, desc: Descriptor) -> None:
        self.desc = desc
        self.asked = 0

    async def resolve(self, ref: Reference) -> Descriptor | None:
        self.asked += 1
        return self.desc

    async def find(self, *_: object) -> None:
        return None


async def test_tags_fall_back_to_the_cluster_at_once_while_open(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)
    reg.faults = [stall(servers.release)] * 10
    peers = _Cluster(Descriptor("application/vnd.oci.image.manifest.v1+json", Digest.of(b"m"), 9))
    async with source(reg, timeouts=HUNG, breaker=BreakerPolicy(failures=1)) as src:
        policy = TagPolicy("upstream-first", src)
        upstream_source = _Named(SourceKind.UPSTREAM)
        assert await policy.resolve(ref(reg), [peers, upstream_source]) == peers.desc
        asked = len(reg.seen)
        for _ in range(5):
            assert await policy.resolve(ref(reg), [peers, upstream_source]) == peers.desc
        assert len(reg.seen) == asked == 1
        assert peers.asked == 6


class _Named:
    def __init__(self, name: SourceKind) -> None:
        self.name = name

    async def resolve(self, ref: Reference) -> None:
        return None

    async def find(self, *_: object) -> None:
        return None
