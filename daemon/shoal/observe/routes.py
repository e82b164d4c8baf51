"""`/status` (HTML) and `/status.json` on the metrics port."""

from __future__ import annotations

import logging

from aiohttp import web

from shoal.observe.facts import NodeParts, status
from shoal.observe.page import render

log = logging.getLogger("shoal.observe")


def add_status_routes(app: web.Application, parts: NodeParts) -> None:
    async def status_json(request: web.Request) -> web.Response:
        return web.json_response(status(parts, pulls=_limit(request)))

    async def status_page(request: web.Request) -> web.Response:
        return web.Response(
            text=render(status(parts, pulls=_limit(request))),
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def root(_: web.Request) -> web.Response:
        raise web.HTTPFound("/status")

    app.router.add_get("/status.json", status_json)
    app.router.add_get("/status", status_page)
    app.router.add_get("/", root)


def _limit(request: web.Request) -> int:
    raw = request.query.get("pulls", "50")
    return min(200, int(raw)) if raw.isdigit() else 50
