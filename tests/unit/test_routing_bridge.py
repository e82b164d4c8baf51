"""The asyncio -> trio bridge the libp2p router runs on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from shoal.routing.bridge import TrioThread


@pytest.fixture
async def bridge() -> AsyncIterator[TrioThread]:
    thread = TrioThread()
    await asyncio.to_thread(thread.start)
    yield thread
    await asyncio.to_thread(thread.stop)


async def test_results_and_errors_come_back(bridge: TrioThread) -> None:
    async def add(a: int, b: int) -> tuple[int, str]:
        await trio.lowlevel.checkpoint()
        return a + b, threading.current_thread().name

    value, thread_name = await bridge.submit(add, 2, 3)
    assert value == 5 and thread_name == "shoal-trio"

    async def boom() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        await bridge.submit(boom)


async def test_many_in_flight(bridge: TrioThread) -> None:
    async def echo(i: int) -> int:
        await trio.sleep(0.001)
        return i

    assert await asyncio.gather(*(bridge.submit(echo, i) for i in range(500))) == list(range(500))


async def test_cancelling_the_future_cancels_the_trio_task(bridge: TrioThread) -> None:
    seen: dict[str, Any] = {}

    async def slow() -> None:
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            seen["cancelled"] = True
            raise

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bridge.submit(slow), 0.05)
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen == {"cancelled": True}


async def test_start_service_resolves_when_started(bridge: TrioThread) -> None:
    events: list[str] = []

    async def service(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        events.append("starting")
        task_status.started("up")
        await trio.sleep(0.05)
        events.append("still running")

    assert await bridge.start_service(service) == "up"
    assert events == ["starting"]
    await asyncio.sleep(0.2)
    assert events == ["starting", "still running"]


async def test_stop_fails_pending_calls_instead_of_hanging() -> None:
    thread = TrioThread()
    await asyncio.to_thread(thread.start)
    pending = thread.submit(trio.sleep_forever)
    await asyncio.sleep(0.05)
    await asyncio.to_thread(thread.stop)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(pending, 2)
    with pytest.raises(RuntimeError):
        await thread.submit(trio.sleep, 0)
