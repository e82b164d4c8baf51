"""Follow containerd's events, and resync in full whenever the stream may have missed some.

containerd does not replay events: after any break (containerd restarted, socket gone, a handler
failed) the only safe way back is to subscribe again and then re-read everything.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shoal.containerd.connection import quote_filter
from shoal.containerd.events import DEFAULT_EVENT_FILTERS
from shoal.containerd.model import ContainerdError, Event

log = logging.getLogger("shoal.containerd")


class EventSource(Protocol):
    """What the watcher needs of containerd (shoal.containerd.events.EventCalls)."""

    def subscription(self, filters: Sequence[str] | None) -> Any: ...

    def events_of(self, call: Any) -> AsyncGenerator[Event, None]: ...

    async def publish(self, topic: str) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: `initial`, doubling up to `maximum`, +-`jitter` (a fraction).
    The delay resets once a subscription has stayed up for `stable` seconds."""

    initial: float = 0.5
    maximum: float = 30.0
    jitter: float = 0.2
    stable: float = 30.0

    def delays(self) -> Callable[[bool], float]:
        current = self.initial

        def next_delay(reset: bool) -> float:
            nonlocal current
            if reset:
                current = self.initial
            delay = current * (1 + random.uniform(-self.jitter, self.jitter))
            current = min(current * 2, self.maximum)
            return delay

        return next_delay


async def _confirm(
    client: EventSource, events: AsyncGenerator[Event, None], probe: str, limit: float
) -> None:
    """Returns once a probe event published on `probe` came back through `events`.

    The probe is published again and again: one sent before containerd registered the
    subscriber is simply lost.
    """

    async def keep_publishing() -> None:
        delay = 0.02
        while True:
            await client.publish(probe)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    publisher = asyncio.create_task(keep_publishing())
    try:
        async with asyncio.timeout(limit):
            # Events before the probe are covered by the resync that follows.
            while (await anext(events)).topic != probe:
                pass
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)


async def watch(
    client: EventSource,
    on_event: Callable[[Event], Awaitable[None]],
    on_resync: Callable[[], Awaitable[None]],
    *,
    filters: Sequence[str] | None = None,
    backoff: Backoff = Backoff(),
    on_break: Callable[[Exception], None] | None = None,
    probe_timeout: float = 10.0,
) -> None:
    """Calls `on_event` for each event and `on_resync` after every (re)subscription; forever.

    `on_resync` runs only once the subscription is known to be live, so nothing that happens
    during a resync is lost: the watcher publishes probe events on a topic of its own until
    one comes back (gRPC cannot tell when containerd has registered a subscriber).
    Any exception (stream error, end of stream, or one raised by a callback) counts as a
    break: `on_break` is told, and after a backoff delay the cycle starts again. Cancel the
    task to stop. `filters` are as for EventCalls.subscribe.
    """
    next_delay = backoff.delays()
    wanted = list(DEFAULT_EVENT_FILTERS if filters is None else filters)
    while True:
        started = time.monotonic()
        call: Any = None
        events: AsyncGenerator[Event, None] | None = None
        try:
            probe = f"/shoal/sync/{os.urandom(8).hex()}"
            call = client.subscription([*wanted, f"topic=={quote_filter(probe)}"])
            events = client.events_of(call)
            await _confirm(client, events, probe, probe_timeout)
            await on_resync()
            async for event in events:
                if event.topic != probe:
                    await on_event(event)
            raise ContainerdError("containerd closed the event stream")
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if isinstance(err, StopAsyncIteration | TimeoutError):
                err = ContainerdError(f"event subscription did not come up: {err!r}")
            log.warning("containerd event stream broken, resubscribing: %s", err)
            if on_break is not None:
                on_break(err)
        finally:
            if events is not None:
                await events.aclose()
            if call is not None:
                # aclose() skips the generator's cleanup if it never started.
                call.cancel()
        await asyncio.sleep(next_delay(time.monotonic() - started >= backoff.stable))
