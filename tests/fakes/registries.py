"""Small registries, token servers and CDNs on 127.0.0.1 for the upstream client's tests.

Every server records each request it saw (method, path, query, headers), so tests can assert
what was sent where, including that nothing was. Faults are scripted per request.
tests/unit/test_fakes.py tests the fakes themselves, so that a broken fake cannot make the
client's tests pass vacuously.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.oci.digest import Digest

_ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    raw_query: str  # as sent, still percent-encoded

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


def record(request: web.Request) -> Seen:
    return Seen(
        request.method,
        request.path,
        dict(request.query),
        {k.lower(): v for k, v in request.headers.items()},
        request.raw_path.partition("?")[2],
    )


Fault = Callable[[web.Request], Awaitable[web.StreamResponse]]


def status(code: int, headers: dict[str, str] | None = None) -> Fault:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, headers=headers or {})

    return answer


def stall(release: asyncio.Event) -> Fault:
    """Accepts the request and never answers (until the test ends)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=503)

    return answer


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def serve_bytes(
    request: web.Request,
    data: bytes,
    *,
    honour_range: bool = True,
    cut: int | None = None,
    chunked: bool = False,
    stall_after: asyncio.Event | None = None,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """data with Range support; `cut` drops the connection after that many body bytes,
    `chunked` ends the body cleanly at `cut` instead, `stall_after` stops sending at `cut`."""
    hdrs = dict(headers or {})
    start, end, code = 0, len(data), 200
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
    if match and honour_range:
        start = int(match.group(1))
        end = int(match.group(2)) + 1 if match.group(2) else len(data)
        code = 206
        hdrs["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
    body = data[start:end]
    if request.method == "HEAD":
        hdrs["Content-Length"] = str(len(body))
        return web.Response(status=code, headers=hdrs)
    resp = web.StreamResponse(status=code, headers=hdrs)
    if chunked:
        resp.enable_chunked_encoding()
    else:
        resp.content_length = len(body)
    await resp.prepare(request)
    if cut is not None and cut < len(body):
        await resp.write(body[:cut])
        if chunked:
            await resp.write_eof()  # a clean end, but short
        elif stall_after is not None:
            await stall_after.wait()
        else:
            await asyncio.sleep(0.01)  # let the partial body leave before the cut
            assert request.transport is not None
            request.transport.abort()
        return resp
    await resp.write(body)
    await resp.write_eof()
    return resp


class Server:
    """A recording aiohttp server on 127.0.0.1."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []  # answered first, one per request, in order
        self.server: TestServer | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._entry)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def host(self) -> str:
        assert self.server is not None and self.server.port is not None
        return f"127.0.0.1:{self.server.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(record(request))
        if self.faults:
            return await self.faults.pop(0)(request)
        return await self.handle(request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def requests(self, method: str | None = None, contains: str = "") -> list[Seen]:
        return [
            s for s in self.seen if (method is None or s.method == method) and contains in s.path
        ]


@dataclass
class Issued:
    token: str
    service: str
    scope: str
    authorization: str | None


class FakeTokenServer(Server):
    """Issues `tok-<n>` for any scope; with `users`, only to requests carrying their Basic."""

    def __init__(self, *, expires_in: Any = 300, users: dict[str, str] | None = None) -> None:
        super().__init__()
        self.expires_in = expires_in
        self.users = users
        self.issued: dict[str, Issued] = {}

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        if self.users is not None and auth not in {basic(u, p) for u, p in self.users.items()}:
            return web.Response(status=401)
        token = f"tok-{len(self.issued) + 1}"
        self.issued[token] = Issued(
            token, request.query.get("service", ""), request.query.get("scope", ""), auth
        )
        doc: dict[str, Any] = {"token": token}
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        return web.json_response(doc)


class FakeCDN(Server):
    """Serves blobs under /cdn/<digest>, as storage behind a registry's redirect would."""

    def __init__(self) -> None:
        super().__init__()
        self.blobs: dict[str, bytes] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs.get(request.path.rsplit("/", 1)[-1])
        if data is None:
            return web.Response(status=404)
        return await serve_bytes(request, data)


@dataclass
class FakeRegistry(Server):
    """A pull-only registry. `auth`: None, "bearer" (tokens of `token_server` issued for its
    `service`) or "basic" (`users`)."""

    auth: str | None = None
    token_server: FakeTokenServer | None = None
    service: str = "fake-registry"
    users: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # tag or digest
    blobs: dict[str, bytes] = field(default_factory=dict)
    redirect_blobs_to: str | None = None  # base URL of a FakeCDN
    head_digest: bool = True  # send Docker-Content-Digest on manifest HEADs
    honour_range: bool = True
    cuts: list[int] = field(default_factory=list)  # cut successive blob GETs after n bytes
    chunked_cuts: bool = False
    stall_blob: asyncio.Event | None = None  # with cuts: stall instead of cutting

    def __post_init__(self) -> None:
        Server.__init__(self)

    def add_manifest(self, body: bytes, media_type: str, tag: str | None = None) -> Digest:
        digest = Digest.of(body)
        self.manifests[str(digest)] = (media_type, body)
        if tag is not None:
            self.manifests[tag] = (media_type, body)
        return digest

    def add_blob(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.blobs[str(digest)] = data
        return digest

    def _authorised(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if self.auth == "basic":
            return auth in {basic(u, p) for u, p in self.users.items()}
        if self.auth == "bearer":
            assert self.token_server is not None
            issued = self.token_server.issued.get(auth.removeprefix("Bearer "))
            return issued is not None and issued.service == self.service
        return True

    def _challenge(self, request: web.Request) -> web.Response:
        if self.auth == "basic":
            value = 'Basic realm="fake"'
        else:
            assert self.token_server is not None
            name = _ROUTE.match(request.path)
            scope = f"repository:{name['name']}:pull" if name else ""
            value = (
                f'Bearer realm="{self.token_server.realm}",service="{self.service}",scope="{scope}"'
            )
        return web.Response(status=401, headers={"WWW-Authenticate": value})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return self._challenge(request)
        match = _ROUTE.match(request.path)
        if match is None:
            return web.json_response({})
        if match["kind"] == "manifests":
            found = self.manifests.get(match["ref"])
            if found is None:
                return web.Response(status=404)
            media_type, body = found
            headers = {"Content-Type": media_type, "Content-Length": str(len(body))}
            if self.head_digest or request.method == "GET":
                headers["Docker-Content-Digest"] = str(Digest.of(body))
            if request.method == "HEAD":
                return web.Response(status=200, headers=headers)
            return web.Response(status=200, body=body, headers=headers)
        data = self.blobs.get(match["ref"])
        if data is None:
            return web.Response(status=404)
        if self.redirect_blobs_to is not None:
            # A signed-URL-like query that must arrive byte-exact.
            location = f"{self.redirect_blobs_to}/cdn/{match['ref']}?sig=a%2Fb%3D&x=1"
            return web.Response(status=307, headers={"Location": location})
        cut = self.cuts.pop(0) if self.cuts and request.method == "GET" else None
        return await serve_bytes(
            request,
            data,
            honour_range=self.honour_range,
            cut=cut,
            chunked=self.chunked_cuts,
            stall_after=self.stall_blob,
            headers={"Docker-Content-Digest": match["ref"]},
        )


class Servers:
    """Starts fakes on demand and closes all of them at the end of a test."""

    def __init__(self) -> None:
        self._all: list[Server] = []
        self.release = asyncio.Event()  # wakes stalled handlers at teardown

    async def _start(self, server: Any) -> Any:
        await server.start()
        self._all.append(server)
        return server

    async def registry(self, **kwargs: Any) -> FakeRegistry:
        return await self._start(FakeRegistry(**kwargs))

    async def tokens(self, **kwargs: Any) -> FakeTokenServer:
        return await self._start(FakeTokenServer(**kwargs))

    async def cdn(self) -> FakeCDN:
        return await self._start(FakeCDN())

    async def close(self) -> None:
        self.release.set()
        for server in self._all:
            await server.close()

    def seen(self) -> list[Seen]:
        return [s for server in self._all for s in server.seen]


async def open_servers() -> AsyncIterator[Servers]:
    servers = Servers()
    try:
        yield servers
    finally:
        await servers.close()
