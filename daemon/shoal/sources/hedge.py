"""Asking several peers for one thing: the next is asked too when the running ones are slow."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shoal.routing.base import Peer

log = logging.getLogger("shoal.peers")

T = TypeVar("T")


async def hedged(
    peers: list[Peer],
    ask: Callable[[Peer], Awaitable[T]],
    hedge_after: float,
    per_peer: float,
) -> tuple[Peer, T] | None:
    """Asks peers in order, starting the next one whenever the running ones are slower than
    `hedge_after` (or one failed); the first success wins and the rest are cancelled."""
    pending: dict[asyncio.Task[T], Peer] = {}
    queue = list(peers)
    deadline = time.monotonic() + per_peer * max(1, len(peers))
    try:
        while queue or pending:
            if queue:
                peer = queue.pop(0)
                task = asyncio.ensure_future(asyncio.wait_for(ask(peer), per_peer))
                pending[task] = peer
            wait = hedge_after if queue else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                peer = pending.pop(task)
                if task.exception() is None:
                    return peer, task.result()
                log.debug("peer %s: %s", peer.address, task.exception())
            if not queue and not done and time.monotonic() >= deadline:
                return None
        return None
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
