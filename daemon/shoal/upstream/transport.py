"""HTTP for upstream: one session, timeouts, bounded retries, and redirects followed by hand.

Redirects are followed here rather than by aiohttp so that `Authorization` is attached per hop,
only while the hop's origin is the one the credentials belong to: blob downloads are redirected
to storage and CDN hosts, which must never see a registry's token or password.

Each hop must be connected within `connect` seconds and answered (status and headers) within
`first_byte`; a body may then stay silent for `read` seconds between chunks. A hop that is not
answered in time is not asked again within the same request (a registry that accepts
connections and never answers, e.g. a stopped process, would cost that much per attempt), and
it counts against its origin's circuit breaker (`breaker`), as connection errors and 502/503/504
do; while a breaker is open, requests to that origin fail at once with CircuitOpen.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from shoal import __version__, metrics
from shoal.content.model import READ_BUFSIZE
from shoal.upstream.allowlist import Origin, origin
from shoal.upstream.breaker import Breakers
from shoal.upstream.errors import UpstreamInvalid, UpstreamUnavailable

log = logging.getLogger("shoal.upstream")

USER_AGENT = f"shoal/{__version__}"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# 501 (not implemented) and 505 are answers, not outages.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# What a proxy or load balancer in front of a registry that is down answers.
_OUTAGE_STATUS = frozenset({502, 503, 504})
# Errors worth another attempt: the network, or a server that went away mid-answer.
RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 3.0  # TCP + TLS handshake
    first_byte: float = 3.0  # from sending a request to its answer's status and headers
    read: float = 30.0  # between any two chunks of a body
    operation: float = 60.0  # a whole small exchange (HEAD, manifest, token), retries included


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff: float = 0.5  # first pause; doubles per attempt, with jitter
    max_backoff: float = 8.0
    max_retry_after: float = 30.0  # a longer Retry-After gives up instead of stalling a pull
    max_redirects: int = 5

    def pause(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * 2**attempt)
        return base * random.uniform(0.5, 1.0)  # jitter: nodes must not retry in lockstep


@dataclass(frozen=True)
class ScopedAuth:
    """An Authorization value and the one origin it may be sent to."""

    origin: Origin
    header: str


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Transport:
    def __init__(
        self,
        *,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        resolver: AbstractResolver | None = None,
        trust_env: bool = False,
        limit: int = 64,
        limit_per_host: int = 16,
        breakers: Breakers | None = None,
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.breakers = breakers or Breakers()
        self._resolver = resolver
        self._trust_env = trust_env
        self._limits = (limit, limit_per_host)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running loop, and the daemon builds its
        # sources before the loop runs.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limits[0],
                limit_per_host=self._limits[1],
                ttl_dns_cache=60,
                resolver=self._resolver,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeouts.connect, sock_read=self.timeouts.read
                ),
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                auto_decompress=False,  # bytes are hashed exactly as the registry stores them
                read_bufsize=READ_BUFSIZE,
                cookie_jar=aiohttp.DummyCookieJar(),  # nothing carried from one host to another
                trust_env=self._trust_env,
                trace_configs=[_tracing(self.timeouts)],
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        method: str,
        url: URL,
        *,
        headers: Mapping[str, str] | None = None,
        auth: ScopedAuth | None = None,
    ) -> aiohttp.ClientResponse:
        """The final answer after redirects; 5xx, 429 and network errors are retried.

        The caller owns the returned response (release or close it). Raises UpstreamUnavailable
        when the attempts run out, UpstreamInvalid for a redirect that cannot be followed.
        """
        policy = self.retry
        for attempt in range(policy.attempts):
            last = attempt == policy.attempts - 1
            try:
                resp = await self._follow(method, url, headers or {}, auth)
            except TimeoutError as exc:  # not answering: the next attempt would wait as long
                raise UpstreamUnavailable(f"{method} {_safe(url)}: no answer in time") from exc
            except RETRYABLE as exc:
                metrics.UPSTREAM_ERRORS.labels(_host(url), "connection").inc()
                if last:
                    raise UpstreamUnavailable(f"{method} {_safe(url)}: {exc!r}") from exc
                await asyncio.sleep(policy.pause(attempt))
                continue
            except aiohttp.ClientError as exc:
                raise UpstreamInvalid(f"{method} {_safe(url)}: {exc!r}") from exc
            if resp.status not in _RETRY_STATUS:
                return resp
            if resp.status == 429:
                metrics.UPSTREAM_THROTTLED.labels(_host(url)).inc()
            else:
                metrics.UPSTREAM_ERRORS.labels(_host(url), str(resp.status)).inc()
            wait = retry_after(resp.headers.get("Retry-After"))
            resp.release()
            what = f"{resp.status} from {_safe(url)}"
            if wait is not None and wait > policy.max_retry_after:
                raise UpstreamUnavailable(f"{what}, Retry-After {wait:.0f}s")
            if last:
                raise UpstreamUnavailable(f"{what} after {attempt + 1} tries")
            log.info("%s, retrying", what)
            await asyncio.sleep(wait if wait is not None else policy.pause(attempt))
        raise AssertionError("unreachable")

    async def _follow(
        self, method: str, url: URL, headers: Mapping[str, str], auth: ScopedAuth | None
    ) -> aiohttp.ClientResponse:
        for _ in range(self.retry.max_redirects + 1):
            hop = dict(headers)
            if auth is not None and origin(url) == auth.origin:
                hop["Authorization"] = auth.header
            resp = await self._hop(method, url, hop)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.release()
            url = redirect_target(url, location)
        raise UpstreamInvalid(f"more than {self.retry.max_redirects} redirects from {_safe(url)}")

    async def _hop(
        self, method: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """One request to one origin, through that origin's breaker (raises CircuitOpen,
        TimeoutError when not connected or answered in time, or a RETRYABLE error)."""
        breaker = self.breakers.of(origin(url))
        ticket = breaker.admit()
        try:
            # Armed by the connection's trace events: waiting for a free connection of the
            # pool (other downloads from this host) is not the origin's silence.
            async with asyncio.timeout(None) as deadline:
                resp = await self.session().request(
                    method,
                    url,
                    headers=headers,
                    allow_redirects=False,
                    trace_request_ctx=_Deadline(deadline),
                )
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else repr(exc)
            breaker.failed(ticket, why)
            raise
        except BaseException:
            breaker.abandoned(ticket)
            raise
        if resp.status in _OUTAGE_STATUS:
            breaker.failed(ticket, f"status {resp.status}")
        else:
            breaker.succeeded(ticket)
        return resp


@dataclass(frozen=True)
class _Deadline:
    """A request's deadline, moved as its connection progresses (aiohttp trace events)."""

    timeout: asyncio.Timeout

    def arm(self, seconds: float) -> None:
        self.timeout.reschedule(asyncio.get_running_loop().time() + seconds)


def _tracing(timeouts: Timeouts) -> aiohttp.TraceConfig:
    async def connecting(_: object, ctx: Any, __: object) -> None:
        if isinstance(ctx.trace_request_ctx, _Deadline):
            ctx.trace_request_ctx.arm(timeouts.connect)

    async def connected(_: object, ctx: Any, __: object) -> None:
        if isinstance(ctx.trace_request_ctx, _Deadline):
            ctx.trace_request_ctx.arm(timeouts.first_byte)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(connecting)
    trace.on_connection_create_end.append(connected)
    trace.on_connection_reuseconn.append(connected)
    return trace


def redirect_target(current: URL, location: str) -> URL:
    try:
        target = current.join(URL(location, encoded=True))  # signed URLs must stay byte-exact
    except ValueError as exc:
        raise UpstreamInvalid(f"bad redirect Location from {_safe(current)}") from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise UpstreamInvalid(f"redirect to unsupported URL from {_safe(current)}")
    if current.scheme == "https" and target.scheme == "http":
        raise UpstreamInvalid(f"redirect from https to http refused ({_safe(current)})")
    return target


def _host(url: URL) -> str:
    """The registry a request went to, as `host[:port]` (the metrics' label)."""
    port = url.explicit_port
    return f"{url.host}:{port}" if port is not None else url.host or ""


def _safe(url: URL) -> str:
    """A URL fit for logs: redirect targets carry signatures in their query."""
    return str(url.with_query(None).with_user(None))


async def read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of a small answer; more than `limit` bytes is UpstreamInvalid."""
    if resp.content_length is not None and resp.content_length > limit:
        raise UpstreamInvalid(f"answer of {resp.content_length} bytes, more than {limit}")
    buf = bytearray()
    try:
        async for chunk in resp.content.iter_chunked(64 * 1024):
            buf += chunk
            if len(buf) > limit:
                raise UpstreamInvalid(f"answer longer than {limit} bytes")
    except RETRYABLE as exc:
        raise UpstreamUnavailable(f"reading {_safe(resp.url)}: {exc!r}") from exc
    return bytes(buf)
