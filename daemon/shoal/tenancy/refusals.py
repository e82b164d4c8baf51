"""Every refusal counted by reason (`shoal_refusals_total`) and logged, at most one line per
reason every INTERVAL seconds. Lines name the reason, the client's address and what kind of
object was asked for: never a digest, a repository, a tag or a credential."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shoal import metrics

log = logging.getLogger("shoal.tenancy")

INTERVAL = 10.0

# Answers to clients that proved nothing or proved wrongly (401/403, before any lookup).
UNAUTHENTICATED = "unauthenticated"  # not this node's containerd, no signature or capability
UNSIGNED_PEER = "unsigned_peer"  # peer marks without a signature
NO_CLUSTER_KEY = "no_cluster_key"  # a signed request, but this node has no key to check it
# Content withheld (answered as a miss): private, or of unknown status without opt-in.
PRIVATE = "private"
UNKNOWN = "unknown"


class Refusals:
    def __init__(
        self,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        listener: Callable[[str, str], None] | None = None,
    ) -> None:
        """`listener` is told of every refusal (the status page's list)."""
        self.interval = interval
        self.listener = listener
        self.clock = clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}  # refusals not logged since the last line

    def refused(self, reason: str, what: str) -> None:
        """Counts one refusal; `what` says whom and what without naming content."""
        metrics.REFUSALS.labels(reason).inc()
        if self.listener is not None:
            self.listener(reason, what)
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return
        self._last[reason] = now
        more = self._quiet.pop(reason, 0)
        suffix = f" (and {more} more since the last line)" if more else ""
        log.warning("refused (%s): %s%s", reason, what, suffix, extra={"shoal_reason": reason})
