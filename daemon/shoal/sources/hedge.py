"""Asking several peers for one thing: the next is asked too when the running ones are slow."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from shoal.routing.base import Peer

log = logging.getLogger("shoal.peers")

T = TypeVar("T")


async def hedged(
    peers: list[Peer],
    ask: Callable[[Peer], Awaitable[T]],
    hedge_after: float,
    per_peer: float,
    slow: Callable[[Peer], None] | None = None,
) -> tuple[Peer, T] | None:
    """Asks peers in order, starting the next one whenever the running ones are slower than
    `hedge_after` (or one failed); the first success wins and the rest are cancelled. `slow` is
    told of every peer that failed to answer (an answer that it lacks the thing is no failure)
    or was overtaken by one asked after it."""
    pending: dict[asyncio.Task[T], Peer] = {}
    started: list[Peer] = []
    queue = list(peers)
    deadline = time.monotonic() + per_peer * max(1, len(peers))

    def tell(peer: Peer) -> None:
        if slow is not None:
            slow(peer)

    try:
        while queue or pending:
            if queue:
                peer = queue.pop(0)
                task = asyncio.ensure_future(asyncio.wait_for(ask(peer), per_peer))
                pending[task] = peer
                started.append(peer)
            wait = hedge_after if queue else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                peer = pending.pop(task)
                exc = task.exception()
                if exc is None:
                    overtaken = started[: started.index(peer)]
                    for other in pending.values():
                        if other in overtaken:
                            tell(other)
                    return peer, task.result()
                if not isinstance(exc, aiohttp.ClientResponseError):
                    tell(peer)
                log.debug("peer %s: %s", peer.address, exc)
            if not queue and not done and time.monotonic() >= deadline:
                for peer in pending.values():
                    tell(peer)
                return None
        return None
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
