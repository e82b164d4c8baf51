"""Raw HTTP for tests of what a server does with any bytes: send them, read what comes back.

`read_response` parses one answer off a socket without trusting it (no client library that
would reject or repair odd answers); `serve` runs an app behind shoal's own HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from shoal.registry.httpserver import RegistryRunner, ServerLimits


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    body: bytes = b""

    def oci_error(self) -> str | None:
        """The first OCI error code of the body, or None when the body is not an OCI error."""
        if not self.headers.get("content-type", "").startswith("application/json"):
            return None
        try:
            doc = json.loads(self.body)
            return doc["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None


async def read_response(
    reader: asyncio.StreamReader, *, head: bool = False, timeout: float = 10.0
) -> Answer | None:
    """One response, or None when the connection closed before any byte of one."""
    async with asyncio.timeout(timeout):
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        answer = Answer(int(parts[1]))
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                answer.headers[name.strip().lower()] = value.strip()
        length = answer.headers.get("content-length")
        if head or answer.status in (204, 304) or 100 <= answer.status < 200:
            return answer
        if length is not None:
            answer.body = await reader.readexactly(int(length))
        else:
            answer.body = await reader.read()
        return answer


async def exchange(
    port: int,
    data: bytes,
    *,
    host: str = "127.0.0.1",
    head: bool = False,
    bind: str | None = None,
    timeout: float = 10.0,
) -> Answer | None:
    """Sends `data` on a new connection and reads one answer (None: closed without one)."""
    local = (bind, 0) if bind else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, head=head, timeout=timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, limits: ServerLimits | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[int, RegistryRunner]]:
    """The app behind RegistryRunner on an unused port: yields (port, runner)."""
    # Imported here: e2e tests read answers with this module and must not need shoal itself.
    from shoal.registry.httpserver import RegistryRunner, ServerLimits

    runner = RegistryRunner(app, limits or ServerLimits(), shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    try:
        yield runner.addresses[0][1], runner
    finally:
        await runner.cleanup()
