"""What every answer of the pull API gets: OCI errors for every failure, the API version and
`OCI-Namespace` headers, timing metrics and a debug access log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from shoal import metrics
from shoal.oci.errors import BlobUnknown, ManifestUnknown, NameUnknown, RegistryError

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
    except web.HTTPException:
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path_qs)
        kind = "manifests" if "/manifests/" in request.path else "blobs"
        internal = ManifestUnknown if kind == "manifests" else BlobUnknown
        resp = error_response(internal("internal error; see logs"), request)
    took = time.monotonic() - started
    metrics.observe(request.method, took)
    if log.isEnabledFor(logging.DEBUG):  # an access log at debug level
        log.debug("%s %s %d %.3fs", request.method, request.path_qs, resp.status, took)
    return resp


async def common_headers(request: web.Request, resp: web.StreamResponse) -> None:
    """Runs before any response's headers go out, streamed ones included."""
    resp.headers.update(_API_VERSION)
    ns = request.query.get("ns")
    if ns is not None:
        resp.headers["OCI-Namespace"] = ns[:255].replace("\r", "").replace("\n", "")


async def not_found(request: web.Request) -> web.StreamResponse:
    raise NameUnknownPath()
