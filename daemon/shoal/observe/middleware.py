"""The one call the serving path makes per answer: a middleware around the pull API that reports
each completed manifest or blob answer to the Recorder and to the per-registry metrics.

What it cannot read from the answer itself (which peer a relayed body came from, how big a
redirected blob is) the peer source notes on the request's context with `note_peer()`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware
from yarl import URL

from shoal import metrics
from shoal.observe.recorder import Pull, Recorder
from shoal.tenancy.admission import ASKER_KEY

log = logging.getLogger("shoal.observe")

_ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
# Distinct `registry` label values before the rest count as "other": `ns` is the client's.
MAX_REGISTRY_LABELS = 32

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Note:
    peer: str | None = None  # host:port of the node that answered
    size: int | None = None  # that node's Content-Length


_NOTE: ContextVar[Note | None] = ContextVar("shoal_observe_note", default=None)


def note_peer(address: str, size: int | None = None) -> None:
    """Called by the peer source when `address` answered for the request being served."""
    note = _NOTE.get()
    if note is not None:
        note.peer, note.size = address, size


class RegistryLabels:
    """Bounded `registry` label values."""

    def __init__(self, limit: int = MAX_REGISTRY_LABELS) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, registry: str) -> str:
        if registry in self.seen:
            return registry
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(registry)
        return registry


def recording(recorder: Recorder) -> Middleware:
    labels = RegistryLabels()

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        match = _ROUTE.match(request.path)
        if match is None:
            return await handler(request)
        note = Note()
        token = _NOTE.set(note)
        started = time.monotonic()
        streaming = request.method == "GET"
        if streaming:
            metrics.STREAMS.inc()
        try:
            resp = await handler(request)
        finally:
            _NOTE.reset(token)
            if streaming:
                metrics.STREAMS.dec()
        try:
            pull = _pull(request, resp, match, note, time.monotonic() - started, recorder)
            recorder.served(pull)
            if pull.source and pull.status < 400:
                registry = labels(pull.registry or "none")
                metrics.PULLS.labels(registry, pull.source, pull.kind).inc()
                if pull.bytes and pull.complete:
                    metrics.PULL_BYTES.labels(registry, pull.source).inc(pull.bytes)
        except Exception as exc:  # the record must never cost an answer
            log.debug("not recorded: %r", exc)
        return resp

    return record


def _pull(
    request: web.Request,
    resp: web.StreamResponse,
    match: re.Match[str],
    note: Note,
    seconds: float,
    recorder: Recorder,
) -> Pull:
    source = resp.headers.get("X-Shoal-Source", "")
    peer = note.peer
    size = resp.content_length or 0
    if resp.status == 307:
        location = URL(resp.headers.get("Location", ""))
        if location.host:
            peer = f"{location.host}:{location.port}" if location.port else location.host
        source = source or "peer"
        size = note.size or 0
    if request.method == "HEAD" or (resp.status >= 300 and resp.status != 307):
        size = 0
    transport = request.transport
    cut = resp.prepared and (transport is None or transport.is_closing()) and resp.status < 300
    return Pull(
        at=recorder.clock(),
        method=request.method,
        kind="manifest" if match["kind"] == "manifests" else "blob",
        registry=request.query.get("ns", "")[:255],
        repository=match["name"][:255],
        reference=match["ref"][:128],
        status=resp.status,
        bytes=size,
        source=source if resp.status < 400 else "",
        asker=_asker(request),
        seconds=seconds,
        peer=peer if source == "peer" else None,
        complete=not cut,
        client=request.remote or "",
    )


def _asker(request: web.Request) -> str:
    """Who admission found the request to be from; "refused" when it was not admitted."""
    asker = request.get(ASKER_KEY)
    return "refused" if asker is None else asker.value
