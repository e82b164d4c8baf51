"""What every answer of the pull API gets: OCI errors for every failure, the API version and
`OCI-Namespace` headers, timing metrics and a debug access log.

No value reaches a response header unchecked: `ns` is echoed only when it is a valid registry
host, and any header value holding a control character is dropped (aiohttp refuses to write
one, and the client would get no answer at all).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from shoal import metrics
from shoal.containerd.model import ContainerdUnavailable
from shoal.oci.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegistryError,
    SizeInvalid,
    Unsupported,
)
from shoal.oci.names import parse_registry_host

log = logging.getLogger("shoal.registry")

_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class NameUnknownPath(NameUnknown):
    def __init__(self) -> None:
        super().__init__("endpoint not served by this pull-only mirror")


def error_response(err: RegistryError, request: web.Request) -> web.Response:
    body = b"" if request.method == "HEAD" else err.body()
    return web.Response(
        status=err.status,
        body=body,
        content_type="application/json",
        headers={"Content-Length": str(len(err.body()))},
    )


def _miss(request: web.Request, message: str) -> RegistryError:
    kind = ManifestUnknown if "/manifests/" in request.path else BlobUnknown
    return kind(message)


def from_http(exc: web.HTTPException, method: str) -> RegistryError:
    """aiohttp's own error answers (no route for `CONNECT host:port` or `OPTIONS *`, a body
    too large…) as an OCI error; a method other than GET and HEAD is 405 wherever it goes."""
    if exc.status == 404 and method in ("GET", "HEAD"):
        return NameUnknownPath()
    if exc.status in (404, 405):
        return Unsupported("method not supported")
    if exc.status == 413:
        return SizeInvalid("request body too large", status=413)
    return Unsupported(exc.reason or "unsupported request", status=exc.status)


@web.middleware
async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OCI error; an unexpected one is logged and answered as a miss."""
    started = time.monotonic()
    try:
        resp = await handler(request)
    except RegistryError as err:
        if err.status == 404:
            metrics.MISSES.labels("manifest" if "/manifests/" in request.path else "blob").inc()
        resp = error_response(err, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error_response(from_http(exc, request.method), request)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except ContainerdUnavailable as exc:
        # Expected while containerd restarts: readiness reports it once (shoal.health); a miss
        # lets containerd try its next host.
        log.debug("containerd unavailable for %s %s: %s", request.method, request.path, exc)
        resp = error_response(_miss(request, "containerd is not answering"), request)
    except (ConnectionError, TimeoutError) as exc:
        # The blob's source (a peer, the spool's fetch) failed before its first byte: a miss
        # sends containerd to its next host.
        log.warning("%s %s: its source failed before the first byte: %s",
                    request.method, request.path, exc)  # fmt: skip
        resp = error_response(_miss(request, "the source failed; try the next host"), request)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path_qs)
        resp = error_response(_miss(request, "internal error; see logs"), request)
    took = time.monotonic() - started
    metrics.observe(request.method, took)
    if log.isEnabledFor(logging.DEBUG):  # an access log at debug level
        log.debug("%s %s %d %.3fs", request.method, request.path_qs, resp.status, took)
    return resp


def namespace_header(ns: str | None) -> str | None:
    """The `OCI-Namespace` value for a request's `ns`: the registry host, if it is one."""
    if ns is None:
        return None
    try:
        return parse_registry_host(ns)
    except NameInvalid:
        return None


async def common_headers(request: web.Request, resp: web.StreamResponse) -> None:
    """Runs before any response's headers go out, streamed ones included."""
    resp.headers.update(_API_VERSION)
    ns = namespace_header(request.query.get("ns"))
    if ns is not None:
        resp.headers["OCI-Namespace"] = ns
    for name, value in list(resp.headers.items()):
        if not value.isprintable():
            log.warning("dropped header %s of %s: a control character", name, request.path)
            del resp.headers[name]


async def not_found(request: web.Request) -> web.StreamResponse:
    raise NameUnknownPath()
