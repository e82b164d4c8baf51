"""The node's recent history for the status page: completed pull API answers, refusals and bytes
by source per minute. The serving path reports each answer once (`shoal.observe.middleware`);
everything here is bounded in memory and costs a few dictionary updates per answer.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# The sources of SourceKind, in the order the page shows them; "to_peers" counts what this node
# served to other nodes (whatever its source).
SOURCES = ("local", "inflight", "peer", "upstream")
SERIES = (*SOURCES, "to_peers")
MINUTES = 60


@dataclass(frozen=True)
class Pull:
    """One answer of the pull API. `source` is empty for a miss or an error; `peer` is the node
    the bytes came from (a redirect's target, or the peer that answered a relayed request);
    `complete` is False when the body was cut off midway."""

    at: float  # wall-clock seconds
    method: str
    kind: str  # "manifest" or "blob"
    registry: str  # `ns`, or "" when the client named none
    repository: str
    reference: str  # the tag or the digest asked for
    status: int
    bytes: int  # body bytes; for a redirect, the size of the blob the client was sent to fetch
    source: str
    asker: str  # "containerd", "peer" or "fetch"
    seconds: float
    peer: str | None = None
    complete: bool = True
    client: str = ""  # the address that asked

    @property
    def redirected(self) -> bool:
        return self.status == 307

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "redirected": self.redirected}


@dataclass(frozen=True)
class Refusal:
    at: float
    reason: str
    what: str  # who asked and for what kind of object; never a digest, tag or credential


class Recorder:
    def __init__(
        self, max_pulls: int = 200, max_refusals: int = 100, clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        self.pulls: deque[Pull] = deque(maxlen=max_pulls)
        self.refusals: deque[Refusal] = deque(maxlen=max_refusals)
        self.refusal_counts: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()  # bytes since start, by series
        self._minutes: dict[int, Counter[str]] = {}
        self.started = clock()

    def served(self, pull: Pull) -> None:
        self.pulls.append(pull)
        if not pull.source or not pull.bytes or not pull.complete:
            return
        if pull.redirected and pull.asker != "containerd":
            return  # a peer redirected elsewhere: no bytes moved through or from this node
        minute = self._minute(pull.at)
        series = [pull.source]
        if pull.asker != "containerd" and not pull.redirected:
            series.append("to_peers")
        for name in series:
            minute[name] += pull.bytes
            self.totals[name] += pull.bytes

    def refused(self, reason: str, what: str) -> None:
        """The tenancy rules' hook: one refusal (a 401/403, or content withheld)."""
        self.refusals.append(Refusal(self.clock(), reason, what))
        self.refusal_counts[reason] += 1

    def _minute(self, at: float) -> Counter[str]:
        key = int(at // 60)
        bucket = self._minutes.get(key)
        if bucket is None:
            bucket = self._minutes[key] = Counter()
            oldest = key - MINUTES
            for stale in [k for k in self._minutes if k <= oldest]:
                del self._minutes[stale]
        return bucket

    def by_minute(self) -> list[dict[str, int]]:
        """The last MINUTES minutes, oldest first, each `{"minute": epoch minute, <series>: bytes}`
        (minutes without traffic included, so a chart needs no gaps filled)."""
        now = int(self.clock() // 60)
        out = []
        for key in range(now - MINUTES + 1, now + 1):
            bucket = self._minutes.get(key, Counter())
            out.append({"minute": key * 60, **{name: bucket[name] for name in SERIES}})
        return out

    def recent(self, limit: int = 50) -> list[Pull]:
        """The latest answers, newest first."""
        return list(reversed(self.pulls))[:limit]


class LastProblem(logging.Handler):
    """Remembers the latest warning or error logged by shoal, for `shoal status`."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__(logging.WARNING)
        self.clock = clock
        self.last: tuple[float, str, str] | None = None  # (time, level, message)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        self.last = (record.created, record.levelname.lower(), message[:300])

    def to_json(self) -> dict[str, Any] | None:
        if self.last is None:
            return None
        at, level, message = self.last
        return {"at": at, "level": level, "message": message}
