"""shoal's HTTP server against hostile clients: every answer an OCI error, deadlines on clients
that stall, and a bound on connections per remote address."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from shoal import metrics
from shoal.registry import httpserver
from shoal.registry.app import make_app
from shoal.registry.httpserver import ServerLimits
from shoal.sources.chain import SourceChain
from shoal.sources.local import LocalSource
from tests.fakes.images import LAYER, NS, build_image
from tests.fakes.rawhttp import exchange, read_response, serve
from tests.fakes.store import FileStore

FAST = ServerLimits(
    header_timeout=0.3, idle_timeout=0.5, write_timeout=0.5, max_per_client=2, sweep_interval=0.05
)
BIG = 64 * 1024 * 1024  # more than loopback's socket buffers hold


def cuts(deadline: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("shoal_connections_cut_total", {"deadline": deadline})
        or 0.0
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[int, dict, httpserver.OciServer]]:
    store = FileStore(tmp_path)
    image = build_image(store)
    image["big"] = store.add(bytes(range(256)) * (BIG // 256))
    async with serve(make_app(SourceChain([LocalSource(store)])), FAST) as (port, runner):
        assert isinstance(runner.server, httpserver.OciServer)
        yield port, image, runner.server


REJECTED_BY_THE_PARSER = [
    b"GARBAGE\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 10_000 + b"\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(200)) + b"\r\n",
    b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /v2/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",  # TLS on the plain port
]


@pytest.mark.parametrize("data", REJECTED_BY_THE_PARSER, ids=range(len(REJECTED_BY_THE_PARSER)))
async def test_what_the_parser_rejects_is_an_oci_error(
    server, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    port, _, _ = server
    with caplog.at_level(logging.DEBUG):
        answer = await exchange(port, data)
    assert answer is not None
    assert answer.status == 400
    assert answer.oci_error() == "UNSUPPORTED"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "data",
    [
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DELETE /v2/a/blobs/sha256:" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
async def test_other_methods_are_unsupported(server, data: bytes) -> None:
    port, _, _ = server
    answer = await exchange(port, data)
    assert answer is not None and answer.status == 405
    assert answer.oci_error() == "UNSUPPORTED"


async def test_an_absolute_form_target_is_served(server) -> None:
    port, image, _ = server
    answer = await exchange(
        port,
        f"GET http://shoal/v2/team/app/manifests/v1?ns={NS} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    assert answer is not None and answer.status == 200
    assert answer.headers["docker-content-digest"] == str(image["mdig"])


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("ns", ["a%01b", "a%7Fb", "a%00b", "a%0D%0AX-Injected:%201", "x" * 300])
async def test_a_bad_ns_is_name_invalid_and_never_reaches_a_header(
    server, method: str, ns: str
) -> None:
    port, _, _ = server
    request = f"{method} /v2/team/app/manifests/v1?ns={ns} HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await exchange(port, request.encode(), head=method == "HEAD")
    assert answer is not None and answer.status == 400
    assert "oci-namespace" not in answer.headers and "x-injected" not in answer.headers
    if method == "GET":
        assert answer.oci_error() == "NAME_INVALID"
    else:  # no body, but the length of the one a GET would get
        assert answer.body == b"" and int(answer.headers["content-length"]) > 0


async def test_a_valid_ns_is_echoed(server) -> None:
    port, _, _ = server
    answer = await exchange(
        port,
        f"HEAD /v2/team/app/manifests/v1?ns={NS} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        head=True,
    )
    assert answer is not None and answer.status == 200
    assert answer.headers["oci-namespace"] == NS


async def test_a_header_value_with_a_control_character_is_dropped() -> None:
    app = web.Application()

    async def bad(_: web.Request) -> web.Response:
        return web.Response(text="{}", headers={"X-Echo": "a\x01b", "X-Fine": "ok"})

    app.router.add_get("/", bad)
    from shoal.registry.middleware import common_headers

    app.on_response_prepare.append(common_headers)
    async with serve(app) as (port, _):
        answer = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer is not None and answer.status == 200
    assert "x-echo" not in answer.headers and answer.headers["x-fine"] == "ok"


async def _closed_by_server(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    """Everything the server still sent, once it closed the connection."""
    got = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(1 << 20)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk


async def test_unfinished_headers_are_cut(server) -> None:
    port, _, _ = server
    before = cuts("header")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # trickled bytes do not extend the deadline
        await asyncio.sleep(0.15)
        writer.write(b"X-Slow: 1\r\n")
    assert await _closed_by_server(reader) == b""
    writer.close()
    assert cuts("header") == before + 1


async def test_an_idle_keep_alive_connection_is_closed(server) -> None:
    port, _, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await read_response(reader)
    assert answer is not None and answer.status == 200
    assert await _closed_by_server(reader) == b""
    writer.close()


async def _stalled_reader(
    port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return reader, writer


async def test_a_client_that_stops_reading_a_blob_is_cut(server) -> None:
    port, image, srv = server
    before = cuts("write")
    reader, writer = await _stalled_reader(port, f"/v2/team/app/blobs/{image['big']}")
    for _ in range(200):  # until the server is cut off (its sendfile() blocked, then shut down)
        await asyncio.sleep(0.05)
        if cuts("write") > before:
            break
    got = await _closed_by_server(reader)
    writer.close()
    assert 0 < len(got) < BIG  # headers and part of the body, never all of it
    assert cuts("write") == before + 1
    for _ in range(100):  # the handler ended too: nothing left on the server
        if not srv.connections:
            break
        await asyncio.sleep(0.05)
    assert srv.connections == []


async def test_a_slow_reader_that_keeps_reading_is_not_cut(server) -> None:
    port, image, _ = server
    reader, writer = await _stalled_reader(port, f"/v2/team/app/blobs/{image['ldig']}")
    got, body = b"", 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            while body < len(LAYER):
                await asyncio.sleep(0.01)  # far slower than the server would send
                chunk = await reader.read(16 * 1024)
                if not chunk:
                    break
                got += chunk
                body = len(got) - got.find(b"\r\n\r\n") - 4 if b"\r\n\r\n" in got else 0
    writer.close()
    assert got.startswith(b"HTTP/1.1 200 ") and body == len(LAYER)


async def test_connections_per_remote_address_are_bounded(server) -> None:
    port, _, _ = server
    held = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))]
    held.append(await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)))
    answer = await exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", bind="127.0.0.2")
    assert answer is not None and answer.status == 429
    assert answer.oci_error() == "TOOMANYREQUESTS"
    # Another address, and this node's own clients, are not affected.
    other = await exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", bind="127.0.0.3")
    assert other is not None and other.status == 200
    local = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    for r, w in local:
        w.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await read_response(r)
        assert answer is not None and answer.status == 200
    for _, w in held + local:
        w.close()
    for _ in range(100):  # closed ones are counted out again
        again = await exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", bind="127.0.0.2")
        if again is not None and again.status == 200:
            break
        await asyncio.sleep(0.02)
    assert again is not None and again.status == 200


def test_an_aiohttp_without_what_the_server_relies_on_is_refused(monkeypatch) -> None:
    httpserver.check()
    monkeypatch.setattr(httpserver, "_SLOTS", (*httpserver._SLOTS, "_gone"))
    with pytest.raises(httpserver.ServerMismatch, match="_gone"):
        httpserver.check()
