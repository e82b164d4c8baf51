"""Waiting on a peer that may take long to answer (the designated fetcher asks upstream
first), but only while it is alive.

A node that crashed sends nothing: no reset, no FIN. A request on a kept-alive connection to
it hangs until its deadline, which for the designated fetcher is the patience a slow registry
needs (20 s), paid on every node for every blob. So past the usual header deadline the peer is
probed on a fresh request that every node answers at once (its p2p info, never upstream-bound);
one that does not answer is taken for dead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import aiohttp

from shoal.registry.protocol import P2P_INFO_PATH
from shoal.routing.base import Peer

T = TypeVar("T")


class Deadlines(Protocol):
    """What the wait needs of `shoal.sources.download.Deadlines`."""

    @property
    def header_timeout(self) -> float: ...

    @property
    def silence(self) -> float: ...

    @property
    def probe_timeout(self) -> float: ...


class Unanswered(TimeoutError):
    """The peer answered neither the request nor a probe."""


async def answers(session: aiohttp.ClientSession, peer: Peer, timeout: float) -> bool:
    """Whether `peer`'s shoal answers at all within `timeout` (any HTTP status counts)."""
    try:
        async with asyncio.timeout(timeout):
            async with session.get(f"http://{peer.address}{P2P_INFO_PATH}") as resp:
                return resp.status < 500
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def while_alive(
    request: Awaitable[T],
    alive: Callable[[], Awaitable[bool]],
    *,
    first: float,
    every: float,
    limit: float,
) -> T:
    """`request`'s result, waited for up to `limit` seconds as long as `alive()` holds: it is
    asked after `first` seconds without an answer, then every `every` seconds."""
    task = asyncio.ensure_future(request)
    waited, step = 0.0, first
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, min(step, limit - waited)))
            if done:
                return task.result()
            waited += step
            if waited >= limit:
                raise Unanswered(f"no answer within {limit:g}s")
            if not await alive():
                raise Unanswered(f"no answer within {waited:g}s, and none to a probe")
            step = every
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def from_live_peer(
    request: Awaitable[T],
    session: aiohttp.ClientSession,
    peer: Peer,
    deadlines: Deadlines,
    patience: float,
) -> T:
    """`request` to `peer`, waited for up to `patience` while `peer` answers probes: the first
    after the header deadline, then one per `silence`."""
    return await while_alive(
        request,
        lambda: answers(session, peer, deadlines.probe_timeout),
        first=deadlines.header_timeout,
        every=deadlines.silence,
        limit=patience,
    )
