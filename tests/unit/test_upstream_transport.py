"""Retries, Retry-After, timeouts and redirects: bounded, and never leaking Authorization."""

from __future__ import annotations

import asyncio
import email.utils
import time
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

from shoal.oci.digest import Digest
from shoal.upstream import (
    RetryPolicy,
    Timeouts,
    UpstreamIncomplete,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from shoal.upstream.transport import redirect_target, retry_after
from tests.fakes.registries import Servers, basic, stall, status
from tests.fakes.upstream import add_image, read_all, ref, source, write_config


def test_retry_after_values() -> None:
    now = 1_700_000_000.0
    assert retry_after("7") == 7.0
    assert retry_after(email.utils.formatdate(now + 12, usegmt=True), now) == pytest.approx(12)
    assert retry_after(email.utils.formatdate(now - 50, usegmt=True), now) == 0.0
    assert retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("-3") is None


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(backoff=1.0, max_backoff=5.0)
    for _ in range(50):
        assert 0.5 <= policy.pause(0) <= 1.0
        assert 2.0 <= policy.pause(2) <= 4.0
        assert 2.5 <= policy.pause(10) <= 5.0
    assert len({policy.pause(3) for _ in range(20)}) > 1


def test_redirect_targets() -> None:
    here = URL("https://reg.example/v2/a/blobs/sha256:x")
    assert str(redirect_target(here, "/other?q=%2F")) == "https://reg.example/other?q=%2F"
    signed = "https://cdn.example/p?X-Sig=a%2Fb%3D&t=1"
    assert str(redirect_target(here, signed)) == signed
    for bad in ("http://cdn.example/p", "ftp://cdn.example/p", "file:///etc/passwd"):
        with pytest.raises(UpstreamInvalid):
            redirect_target(here, bad)
    # From a plain-HTTP registry, both schemes are fine.
    assert redirect_target(URL("http://reg:5000/v2/"), "http://cdn/x").host == "cdn"


async def test_429_retry_after_seconds_is_honoured(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    reg.faults = [status(429, {"Retry-After": "1"})]
    async with source(reg) as src:
        started = time.monotonic()
        desc = await src.lookup(ref(reg))
        waited = time.monotonic() - started
    assert desc is not None and desc.digest == image.digest
    assert waited >= 0.9
    assert [s.method for s in reg.seen] == ["HEAD", "HEAD"]


async def test_429_retry_after_date_is_honoured(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: waits 1 to 2 s
    reg.faults = [status(429, {"Retry-After": when})]
    async with source(reg) as src:
        started = time.monotonic()
        assert await src.lookup(ref(reg)) is not None
        assert time.monotonic() - started >= 0.9


async def test_retry_after_beyond_the_bound_gives_up_at_once(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)
    reg.faults = [status(429, {"Retry-After": "3600"})]
    async with source(reg) as src:
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable):
            await src.lookup(ref(reg))
        assert time.monotonic() - started < 1
        assert await src.resolve(ref(reg)) is not None  # the next call asks again
    assert len(reg.seen) == 2


async def test_5xx_retried_then_success(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    reg.faults = [status(503), status(502)]
    async with source(reg) as src:
        desc = await src.lookup(ref(reg))
    assert desc is not None and desc.digest == image.digest
    assert len(reg.seen) == 3


async def test_5xx_retries_are_bounded(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    reg.faults = [status(500)] * 10
    async with source(reg) as src:
        with pytest.raises(UpstreamUnavailable):
            await src.lookup(ref(reg))
        assert len(reg.seen) == 3
        assert await src.find(ref(reg), image.layer_digest, "blob") is None
    assert len(reg.seen) == 6


async def test_4xx_is_not_retried(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)
    reg.faults = [status(400), status(400)]
    async with source(reg) as src:
        assert await src.resolve(ref(reg)) is None
    # HEAD 400, then the GET any HEAD without a descriptor gets; neither repeated.
    assert [s.method for s in reg.seen] == ["HEAD", "GET"]


async def test_dropped_connections_are_retried_then_given_up() -> None:
    accepted = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    host = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with source(host) as src:
            with pytest.raises(UpstreamUnavailable):
                await src.lookup(ref(host))
    finally:
        server.close()
        await server.wait_closed()
    # Three tries; aiohttp itself repeats an idempotent request once on a dropped connection.
    assert 3 <= accepted <= 6


async def test_refused_connections_fail_fast() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    host = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()
    async with source(host) as src:
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable):
            await src.lookup(ref(host))
        assert await src.find(ref(host), Digest.of(b"x"), "blob") is None
        assert time.monotonic() - started < 2


async def test_stalled_upstream_times_out_without_retrying(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)
    reg.faults = [stall(servers.release)] * 3
    timeouts = Timeouts(connect=1, first_byte=0.3, read=5, operation=10)
    async with source(reg, timeouts=timeouts) as src:
        assert await src.resolve(ref(reg)) is None
    # One attempt: a registry that did not answer in time would not answer the next either.
    assert len(reg.seen) == 1


async def test_whole_operation_is_bounded(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)
    reg.faults = [stall(servers.release)] * 3
    timeouts = Timeouts(connect=1, read=5, operation=0.5)
    async with source(reg, timeouts=timeouts) as src:
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable):
            await src.lookup(ref(reg))
        assert time.monotonic() - started < 1.5


async def test_stall_mid_body_raises(servers: Servers) -> None:
    reg = await servers.registry(cuts=[100_000] * 10, stall_blob=servers.release)
    image = add_image(reg)
    timeouts = Timeouts(connect=1, read=0.3, operation=10)
    async with source(reg, timeouts=timeouts) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
        started = time.monotonic()
        with pytest.raises(UpstreamIncomplete):
            await read_all(blob)
        assert time.monotonic() - started < 5
    assert len(reg.requests("GET")) == 4  # first try and three resumes


async def test_blob_redirect_to_cdn_never_carries_authorization(
    servers: Servers, tmp_path: Path
) -> None:
    tokens = await servers.tokens(users={"alice": "pw"})
    cdn = await servers.cdn()
    reg = await servers.registry(auth="bearer", token_server=tokens, redirect_blobs_to=cdn.url)
    image = add_image(reg)
    cdn.blobs = dict(reg.blobs)
    creds = write_config(tmp_path / "c.json", {reg.host: {"username": "alice", "password": "pw"}})
    async with source(reg, credentials=creds) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None and blob.size == len(image.layer)
        assert await read_all(blob) == image.layer
        assert await read_all(blob, 5, 70_000) == image.layer[5:70_000]
    assert any(s.authorization == "Bearer tok-1" for s in reg.seen)  # auth was in use
    assert [s.method for s in cdn.seen] == ["HEAD", "GET", "GET"]
    assert all("authorization" not in s.headers for s in cdn.seen)
    assert all(s.raw_query == "sig=a%2Fb%3D&x=1" for s in cdn.seen)  # signed URL byte-exact
    assert cdn.seen[2].headers["range"] == "bytes=5-69999"


async def test_redirect_to_another_allowed_registry_with_credentials_gets_none(
    servers: Servers, tmp_path: Path
) -> None:
    """Both hosts have credentials; the redirect target still gets none of either."""
    other = await servers.cdn()
    reg = await servers.registry(auth="basic", users={"ua": "pa"}, redirect_blobs_to=other.url)
    image = add_image(reg)
    other.blobs = dict(reg.blobs)
    creds = write_config(
        tmp_path / "c.json",
        {
            reg.host: {"username": "ua", "password": "pa"},
            other.host: {"username": "ub", "password": "pb"},
        },
    )
    async with source(reg, other, credentials=creds) as src:
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
        assert await read_all(blob) == image.layer
    assert basic("ua", "pa") in {s.authorization for s in reg.seen}
    assert other.seen and all("authorization" not in s.headers for s in other.seen)


async def test_redirect_within_the_registry_keeps_authorization(
    servers: Servers, tmp_path: Path
) -> None:
    reg = await servers.registry(auth="basic", users={"u": "p"})
    image = add_image(reg)
    target = f"/v2/team/app/blobs/{image.layer_digest}"

    async def moved(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": target})

    creds = write_config(tmp_path / "c.json", {reg.host: {"username": "u", "password": "p"}})
    async with source(reg, credentials=creds) as src:
        assert await src.find(ref(reg), image.digest, "manifest") is not None  # learns Basic
        reg.faults = [moved]
        blob = await src.find(ref(reg), image.layer_digest, "blob")
        assert blob is not None
    assert [s.authorization for s in reg.seen[-2:]] == [basic("u", "p")] * 2
    assert reg.seen[-1].path == target


async def test_redirect_loops_are_bounded(servers: Servers) -> None:
    reg = await servers.registry()
    add_image(reg)

    async def loop(request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": request.path})

    reg.faults = [loop] * 20
    async with source(reg, retry=RetryPolicy(attempts=3, backoff=0.01, max_redirects=4)) as src:
        with pytest.raises(UpstreamInvalid):
            await src.lookup(ref(reg))
    assert len(reg.seen) == 5


async def test_throttles_and_errors_are_counted_by_registry(servers: Servers) -> None:
    from shoal import metrics

    reg = await servers.registry()
    add_image(reg)
    reg.faults = [status(429, {"Retry-After": "0"}), status(503)]

    def count(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, {"registry": reg.host, **labels}) or 0.0

    throttled = count("shoal_upstream_throttled_total")
    failed = count("shoal_upstream_errors_total", reason="503")
    async with source(reg) as src:
        assert await src.lookup(ref(reg)) is not None
    assert count("shoal_upstream_throttled_total") == throttled + 1
    assert count("shoal_upstream_errors_total", reason="503") == failed + 1
