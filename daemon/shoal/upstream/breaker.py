"""Circuit breakers: a registry that does not answer is not asked again for a while.

containerd waits on a silent mirror, and every miss that waits out a hung registry's deadline
delays a pull by that much. One breaker per origin (scheme, host, port: the registry itself,
its token realm, the storage it redirects to):

- closed: requests go out; `failures` consecutive failures (no connection, no answer within
  the deadline, 502/503/504) open it;
- open: requests are refused at once, without any connection, for `cooldown` seconds;
- half-open: one request (the probe) goes out, the others are still refused; its success
  closes the breaker, its failure opens it again for twice as long (up to `max_cooldown`).

One log line per state change, never one per request.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from shoal import metrics
from shoal.upstream.errors import UpstreamUnavailable

log = logging.getLogger("shoal.upstream")

Origin = tuple[str, str, int]


class CircuitOpen(UpstreamUnavailable):
    """Refused without a connection: the origin has not been answering."""


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int = 3  # consecutive failures that open a breaker
    cooldown: float = 10.0  # seconds open before one probe may go out
    max_cooldown: float = 60.0  # the cooldown doubles after each failed probe, up to this


def _name(origin: Origin) -> str:
    scheme, host, port = origin
    return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"


class Breaker:
    def __init__(self, origin: Origin, policy: BreakerPolicy, clock: Callable[[], float]) -> None:
        self.origin = origin
        self.policy = policy
        self.clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self._cooldown = policy.cooldown
        self._reopen_at = 0.0
        self._probe: object | None = None  # the one request let through while half-open

    def admit(self) -> object:
        """A ticket for one request; raises CircuitOpen while the origin is not being asked."""
        if self.state is State.OPEN and self.clock() >= self._reopen_at:
            self._change(State.HALF_OPEN, "probing")
        if self.state is State.CLOSED:
            return object()
        if self.state is State.HALF_OPEN and self._probe is None:
            self._probe = object()
            return self._probe
        raise CircuitOpen(f"{_name(self.origin)} is not answering (circuit open)")

    def succeeded(self, ticket: object) -> None:
        self.failures = 0
        if self.state is not State.CLOSED and ticket is self._probe:
            self._probe = None
            self._cooldown = self.policy.cooldown
            self._change(State.CLOSED, "answering again")

    def failed(self, ticket: object, reason: str) -> None:
        if self.state is State.HALF_OPEN and ticket is self._probe:
            self._probe = None
            self._cooldown = min(self._cooldown * 2, self.policy.max_cooldown)
            self._open(f"probe failed: {reason}")
            return
        if self.state is not State.CLOSED:
            return  # a request admitted before the breaker opened
        self.failures += 1
        if self.failures >= self.policy.failures:
            self._open(f"{self.failures} failures in a row, the last: {reason}")

    def abandoned(self, ticket: object) -> None:
        """The request ended without a verdict (cancelled): another probe may go out."""
        if ticket is self._probe:
            self._probe = None

    def _open(self, why: str) -> None:
        self._reopen_at = self.clock() + self._cooldown
        self._change(State.OPEN, f"{why}; misses answered at once for {self._cooldown:.0f}s")

    def _change(self, state: State, why: str) -> None:
        before, self.state = self.state, state
        level = logging.WARNING if state is State.OPEN and before is State.CLOSED else logging.INFO
        log.log(level, "upstream %s: %s -> %s (%s)", _name(self.origin), before, state, why)
        if state is State.OPEN and before is State.CLOSED:
            metrics.UPSTREAM_CIRCUITS_OPEN.inc()
        elif state is State.CLOSED:
            metrics.UPSTREAM_CIRCUITS_OPEN.dec()


class Breakers:
    """The breakers of every origin asked, bounded (the least recently used closed ones go)."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_origins: int = 256,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self.clock = clock
        self.max_origins = max_origins
        self._breakers: OrderedDict[Origin, Breaker] = OrderedDict()

    def of(self, origin: Origin) -> Breaker:
        breaker = self._breakers.get(origin)
        if breaker is None:
            breaker = Breaker(origin, self.policy, self.clock)
            self._breakers[origin] = breaker
            if len(self._breakers) > self.max_origins:
                for old, b in list(self._breakers.items()):
                    if b.state is State.CLOSED and old != origin:
                        del self._breakers[old]
                        break
        self._breakers.move_to_end(origin)
        return breaker

    def state(self, origin: Origin) -> State:
        breaker = self._breakers.get(origin)
        return State.CLOSED if breaker is None else breaker.state
