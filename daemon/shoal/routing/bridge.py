"""Runs trio in a dedicated thread and lets asyncio code await trio coroutines.

py-libp2p is trio-only while the daemon is asyncio (aiohttp). One thread runs `trio.run` with a
root nursery; `submit()` schedules a coroutine function there through the trio token and returns
an asyncio future. Cancelling the future cancels the trio task (callers that touch libp2p streams
must shield what cancellation would corrupt). A round trip costs ≈250 µs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


def _settle(fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _name_os_thread(name: str) -> None:
    """Gives the calling thread `name` in the kernel too (`top -H`, /proc/<pid>/task/*/comm):
    the routing thread's CPU is then told apart from the event loop's."""
    if not sys.platform.startswith("linux"):
        return  # prctl is Linux's; elsewhere the Python thread name is all there is
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME, at most 15 bytes


class TrioThread:
    """A trio event loop in a daemon thread; `start()` and `stop()` are called from any thread."""

    def __init__(self, name: str = "shoal-trio") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._token is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("trio thread already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise RuntimeError("trio thread failed to start") from self._error

    def _run(self) -> None:
        _name_os_thread(self._name)
        try:
            trio.run(self._main)
        except (
            BaseException
        ) as exc:  # surfaced to start() or logged; the thread must not die silently
            self._error = exc
            log.exception("trio thread ended with an error")
        finally:
            self._token = None
            self._started.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await trio.sleep_forever()

    def run_sync_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call a plain function in the trio thread (fire and forget)."""
        if self._token is None:
            raise RuntimeError("trio thread is not running")
        self._token.run_sync_soon(fn, *args)

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """Run `await fn(*args)` in trio; the returned future lives on the caller's asyncio loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def reply(result: Any = None, exc: BaseException | None = None) -> None:
            try:
                loop.call_soon_threadsafe(_settle, fut, result, exc)
            except RuntimeError:  # the asyncio loop is closed: nobody is waiting any more
                pass

        async def runner() -> None:
            settled = False
            try:
                with scope:
                    try:
                        result = await fn(*args)
                    except Exception as exc:
                        reply(exc=exc)
                    else:
                        reply(result)
                    settled = True
            finally:
                # Cancelled by the caller (future already cancelled: a no-op) or by stop().
                if not settled:
                    reply(exc=RuntimeError("routing stopped"))

        def on_done(done: asyncio.Future[T]) -> None:
            if done.cancelled() and self._token is not None:
                try:
                    self._token.run_sync_soon(scope.cancel)
                except trio.RunFinishedError:
                    pass

        fut.add_done_callback(on_done)

        def spawn() -> None:
            if self._nursery is None:
                reply(exc=RuntimeError("trio thread is not running"))
                return
            self._nursery.start_soon(runner)

        if self._token is None:
            fut.set_exception(RuntimeError("trio thread is not running"))
            return fut
        try:
            self._token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            fut.set_exception(RuntimeError("trio thread is not running"))
        return fut

    def start_service(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> asyncio.Future[Any]:
        """`nursery.start(fn, *args)` in the root nursery; resolves once fn calls started().

        fn keeps running after that until it returns or stop() cancels it; it must handle its
        own errors from then on (an escaping exception ends the trio thread).
        """

        async def starter() -> Any:
            assert self._nursery is not None
            return await self._nursery.start(fn, *args)

        return self.submit(starter)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still running in trio and join the thread (blocking)."""
        token, nursery = self._token, self._nursery
        if token is not None and nursery is not None:
            try:
                token.run_sync_soon(nursery.cancel_scope.cancel)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("trio thread did not stop within %.1fs", timeout)
        self._thread = None
