"""An HTTP proxy that misbehaves on purpose, to test resumed downloads and rate limits.

It forwards every request to `target` and records (method, path, Range, status, time). The
first `cuts` responses whose path matches `cut_path` are cut off after `cut_after` body bytes
by closing the connection, as a flaky network would. The first `throttles` requests whose path
matches `throttle_path` get `429 Too Many Requests` with `Retry-After: retry_after`.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    status: int
    content_range: str | None
    cut: bool = False
    at: float = 0.0


@dataclass
class CutProxy:
    target: str  # http://host:port
    cut_path: str = r"/blobs/"
    cut_after: int = 256 * 1024
    cuts: int = 1
    throttle_path: str = r"/blobs/"
    throttles: int = 0
    retry_after: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        if self.throttles > 0 and re.search(self.throttle_path, request.path):
            self.throttles -= 1
            self.seen.append(
                Seen(request.method, request.path, request.headers.get("Range"), 429, None,
                     at=time.monotonic())
            )  # fmt: skip
            return web.json_response(
                {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]},
                status=429, headers={"Retry-After": str(self.retry_after)},
            )  # fmt: skip
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with self._session.request(
            request.method, self.target + request.path_qs, headers=headers,
            allow_redirects=False,
        ) as up:  # fmt: skip
            seen = Seen(
                request.method, request.path, request.headers.get("Range"), up.status,
                up.headers.get("Content-Range"), at=time.monotonic(),
            )  # fmt: skip
            self.seen.append(seen)
            resp = web.StreamResponse(status=up.status)
            for key in (
                "Content-Type",
                "Content-Length",
                "Docker-Content-Digest",
                "Content-Range",
                "Accept-Ranges",
                "Docker-Distribution-API-Version",
            ):
                if key in up.headers:
                    resp.headers[key] = up.headers[key]  # fmt: skip
            await resp.prepare(request)
            # Only a body longer than the cut point can be cut (a small config blob is not).
            cut = (
                request.method == "GET" and self.cuts > 0 and up.status == 200
                and re.search(self.cut_path, request.path) is not None
                and int(up.headers.get("Content-Length", "0")) > self.cut_after
            )  # fmt: skip
            if cut:
                self.cuts -= 1
                seen.cut = True
            sent = 0
            async for chunk in up.content.iter_chunked(64 * 1024):
                if cut and sent + len(chunk) >= self.cut_after:
                    await resp.write(chunk[: self.cut_after - sent])
                    # abort() drops unsent buffers: let the cut-off prefix reach the client.
                    await asyncio.sleep(0.3)
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
            return resp

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def start(self) -> CutProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
