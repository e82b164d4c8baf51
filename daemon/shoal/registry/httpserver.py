"""The registry's HTTP server: aiohttp's, with what a mirror on every node needs around it.

- What aiohttp's HTTP parser rejects before any route runs (a malformed request line, bad or
  oversized headers, bad chunked encoding, TLS on the plain port…) is answered with an OCI error
  JSON body like every other error, counted, and logged at debug level: hostile input is
  expected, not a traceback.
- Deadlines on every client: a request's headers must be complete `header_timeout` seconds after
  its first byte (slowloris), an idle keep-alive connection is closed after `idle_timeout`, and a
  client that stops reading a response is cut after `write_timeout` seconds in which none of the
  bytes waiting for it were acknowledged (the kernel's own count, so sendfile() is covered too).
- Connections per remote address are bounded (`max_per_client`, and `max_connections` in all):
  one more is answered `429 TOOMANYREQUESTS` at once and closed, before its request is read.
  The node's own clients (connecting from the address they connect to, e.g. containerd on
  127.0.0.1) are never refused, so remote clients cannot starve them.

aiohttp has no supported way to change how its parser's rejections are answered, so the
narrowest one is used: a RequestHandler subclass overriding `handle_error`, made by a Server
subclass, which a runner subclass builds (`_make_server`). It also reads a few of the handler's
private slots. `check()` verifies all of these at start, so an aiohttp that changed them stops
`shoal run` with a message instead of answering text/plain or losing a deadline.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import logging
import socket
import struct
import termios
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from shoal import metrics
from shoal.oci.errors import error_body

log = logging.getLogger("shoal.registry")

# RequestHandler's private slots read here, and the methods overridden (checked at start).
_SLOTS = ("_request_count", "_request_in_progress")
_HANDLE_ERROR = ("self", "request", "status", "exc", "message")

# struct tcp_info: tcpi_bytes_acked (u64, Linux 4.1+) follows 104 bytes of older fields.
_TCP_INFO_LEN, _BYTES_ACKED = 232, 120


@dataclass(frozen=True)
class ServerLimits:
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    write_timeout: float = 30.0
    max_per_client: int = 64
    max_connections: int = 1024  # remote clients in all
    sweep_interval: float = 1.0  # how often deadlines are checked


class ServerMismatch(RuntimeError):
    """The installed aiohttp lacks what the registry's server relies on."""


def check() -> None:
    """Raises ServerMismatch naming what is missing, unless everything is there."""
    missing = [s for s in _SLOTS if s not in RequestHandler.__slots__]
    params = tuple(inspect.signature(RequestHandler.handle_error).parameters)
    if params != _HANDLE_ERROR:
        missing.append(f"RequestHandler.handle_error{_HANDLE_ERROR}")
    if not callable(getattr(web.AppRunner, "_make_server", None)):
        missing.append("AppRunner._make_server")
    if missing:
        import aiohttp

        raise ServerMismatch(
            f"aiohttp {aiohttp.__version__} lacks {', '.join(missing)}, which shoal's registry "
            "server overrides or reads"
        )


def _rejection(status: int, code: str, message: str) -> bytes:
    body = error_body(code, message)
    reason = {429: "Too Many Requests"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_TOO_MANY = _rejection(429, "TOOMANYREQUESTS", "too many connections from this address")


class Connection(RequestHandler):
    """One client connection (aiohttp's protocol), with shoal's deadlines and admission."""

    __slots__ = ("_acked", "_client", "_cut_at", "_header_since", "_progress_at")

    def __init__(self, manager: OciServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._client: str | None = None  # the remote address counted, None for local clients
        self._header_since: float | None = None  # first byte of a request not yet complete
        self._acked = -1
        self._progress_at = 0.0
        self._cut_at: float | None = None

    @property
    def server(self) -> OciServer:
        assert isinstance(self._manager, OciServer)
        return self._manager

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server  # connection_lost forgets the manager
        super().connection_made(transport)
        self._progress_at = time.monotonic()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if not isinstance(peer, tuple) or not isinstance(local, tuple) or peer[0] == local[0]:
            return  # this node's own clients: never refused
        if not server.admit(peer[0]):
            metrics.REJECTED.labels("connections").inc()
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_TOO_MANY)
            self.force_close()
            return
        self._client = peer[0]

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._manager
        if self._client is not None and isinstance(server, OciServer):
            server.release(self._client)
            self._client = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a whole request (or a rejected one) arrived
            self._header_since = None
        elif data and self._header_since is None and not self._request_in_progress:
            self._header_since = time.monotonic()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to what its parser rejected (or a failure no route caught): an OCI
        error, logged once at debug level unless it is shoal's own failure (500)."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response is under way: the connection is cut instead")
        if isinstance(exc, HttpProcessingError):
            # aiohttp's messages quote the offending bytes on further lines.
            text = (exc.message or message or "malformed request").split("\n", 1)[0]
            reason = type(exc).__name__
        else:
            text, reason = message or "internal error", "internal"
        if status >= 500:
            log.error("request from %s failed outside any route", request.remote, exc_info=exc)
        else:
            log.debug("rejected a request from %s: %s %s", request.remote, reason, text[:200])
        metrics.REJECTED.labels(reason).inc()
        code = "UNKNOWN" if status >= 500 else "UNSUPPORTED"
        resp = web.Response(
            status=status, body=error_body(code, text[:200]), content_type="application/json"
        )
        resp.force_close()
        return resp

    # -- deadlines, checked by the server's sweep ------------------------------------------------

    def sweep(self, now: float, limits: ServerLimits) -> str | None:
        """Which deadline this connection missed (and is cut for), or None."""
        transport = self.transport
        if transport is None:
            return None
        if self._cut_at is not None:
            return self._cut("", now)  # cut already; aborted if it lingers
        since = self._header_since
        if since is not None and not self._request_in_progress:
            if now - since > limits.header_timeout:
                return self._cut("header", now)
        pending, acked = _unacknowledged(transport)
        if not pending or acked != self._acked:
            self._acked, self._progress_at = acked, now
        elif now - self._progress_at > limits.write_timeout:
            return self._cut("write", now)
        return None

    def _cut(self, deadline: str, now: float) -> str:
        transport = self.transport
        if transport is None:
            return deadline
        if self._cut_at is None:
            metrics.CUT.labels(deadline).inc()
            self._cut_at = now
            sock = transport.get_extra_info("socket")
            try:
                # Not abort(): a sendfile() waiting for the socket to drain would never hear
                # of it. Shut down, and its wait ends with an error, and so does the handler.
                # Closed with a reset (linger 0): a client that reads nothing would otherwise
                # keep the unsent bytes in the kernel, and never hear of the end either.
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RDWR)
                    return deadline
            except OSError:
                pass
        elif now - self._cut_at <= 5.0:
            return deadline
        transport.abort()  # no socket to shut down, or still open seconds after the shutdown
        return deadline


def _unacknowledged(transport: asyncio.BaseTransport) -> tuple[bool, int]:
    """Whether bytes wait for the client (in asyncio's buffer or the kernel's send queue), and
    how many bytes it has acknowledged so far (-1 where the kernel does not say)."""
    buffered = 0
    if isinstance(transport, asyncio.WriteTransport):
        buffered = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is None:
        return buffered > 0, -1
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return buffered > 0, -1
    acked = -1
    if len(info) >= _BYTES_ACKED + 8:
        acked = struct.unpack_from("Q", info, _BYTES_ACKED)[0]
    else:  # an old kernel: the queue shrinking is progress
        acked = -queued
    return buffered > 0 or queued > 0, acked


class OciServer(web.Server):
    """aiohttp's Server making `Connection`s, counting them per address, sweeping deadlines.
    `handler_kwargs` go to every Connection (aiohttp's RequestHandler options)."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        handler_cancellation: bool,
        limits: ServerLimits,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            **handler_kwargs,
        )
        self.limits = limits
        self.handler_kwargs = handler_kwargs
        self._per_client: Counter[str] = Counter()
        self._remote = 0
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> Connection:
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        return Connection(self, loop=loop, **self.handler_kwargs)

    def admit(self, client: str) -> bool:
        limits = self.limits
        if self._per_client[client] >= limits.max_per_client:
            return False
        if self._remote >= limits.max_connections:
            return False
        self._per_client[client] += 1
        self._remote += 1
        return True

    def release(self, client: str) -> None:
        self._remote -= 1
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            now = time.monotonic()
            for conn in self.connections:
                if isinstance(conn, Connection):
                    try:
                        conn.sweep(now, self.limits)
                    except Exception:  # one odd socket must not end every deadline
                        log.exception("deadline check failed")

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await super().shutdown(timeout)


class RegistryRunner(web.AppRunner):
    """An AppRunner whose server is an OciServer (`limits`); its idle keep-alive deadline is
    aiohttp's own `keepalive_timeout`."""

    def __init__(
        self, app: web.Application, limits: ServerLimits, *, shutdown_timeout: float = 60.0
    ) -> None:
        check()
        super().__init__(
            app,
            handle_signals=False,
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=limits.idle_timeout,
        )
        self.limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app started and frozen, as aiohttp does it
        return OciServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            limits=self.limits,
            keepalive_timeout=self.limits.idle_timeout,
        )
