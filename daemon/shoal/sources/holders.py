"""What this node learned about other nodes as holders of content, and the order it asks them in.

- A holder whose bytes failed verification is never asked for that digest again. When the bad
  bytes came from one holder alone, it is that one; when a download was stitched from several
  (one broke off, the next resumed with Range), all of them are suspects: asked after every
  other holder, the one that sent the start of the blob last (a holder that finds its own copy
  bad cuts near the end, and answers 404 from then on: `shoal.integrity`).
- A holder that did not answer in time, stalled or broke off is asked last for a few seconds, so
  a stopped node costs one request a delay, not every request.
- Redirected downloads (`--peer-transfer redirect`) are remembered briefly: containerd asking
  for the same digest from byte 0 again soon after means the holders it was sent to gave it
  bytes that did not match (containerd restarts a blob from 0 only after a failed commit).

Bounded: at most `max_digests` digests and `max_peers` slow holders are remembered, oldest out.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.routing.base import Peer

log = logging.getLogger("shoal.peers")


@dataclass
class _Digest:
    bad: set[str] = field(default_factory=set)
    suspects: list[str] = field(default_factory=list)  # most suspect first
    redirects: list[tuple[str, float]] = field(default_factory=list)  # (holder, when), in order


class Holders:
    def __init__(
        self,
        *,
        slow_for: float = 10.0,
        redirect_window: float = 120.0,
        max_digests: int = 4096,
        max_peers: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slow_for = slow_for
        self.redirect_window = redirect_window
        self.max_digests = max_digests
        self.max_peers = max_peers
        self.clock = clock
        self._digests: OrderedDict[str, _Digest] = OrderedDict()
        self._slow: OrderedDict[str, float] = OrderedDict()  # peer id -> until

    def order(self, digest: str, peers: list[Peer]) -> list[Peer]:
        """`peers` in the order to ask them for `digest`, without those known bad for it."""
        known = self._digests.get(digest)
        bad = known.bad if known else set()
        suspects = known.suspects if known else []
        now = self.clock()

        def rank(item: tuple[int, Peer]) -> tuple[int, int, int]:
            index, peer = item
            if peer.id in suspects:  # most suspect last
                return (2, -suspects.index(peer.id), index)
            return (1 if self._slow.get(peer.id, 0.0) > now else 0, 0, index)

        usable = [(i, p) for i, p in enumerate(peers) if p.id not in bad]
        return [p for _, p in sorted(usable, key=rank)]

    def is_bad(self, digest: str, peer: Peer) -> bool:
        known = self._digests.get(digest)
        return known is not None and peer.id in known.bad

    def failed_verification(self, digest: str, contributors: list[str]) -> None:
        """A download of `digest` did not match; `contributors` sent its bytes, in order."""
        if not contributors:
            return
        known = self._entry(digest)
        if len(set(contributors)) == 1:
            known.bad.add(contributors[0])
            if contributors[0] in known.suspects:
                known.suspects.remove(contributors[0])
            log.warning("peer %s sent %s bytes that did not match; not asked for it again",
                        contributors[0], digest)  # fmt: skip
            return
        for peer_id in reversed(contributors):  # the start of the blob first: most suspect
            if peer_id in known.suspects:
                known.suspects.remove(peer_id)
            known.suspects.insert(0, peer_id)
        log.warning("a download of %s from %s did not match; those are asked last for it",
                    digest, ", ".join(contributors))  # fmt: skip

    def slow(self, peer_id: str) -> None:
        """`peer_id` did not answer in time, stalled or broke off: asked last for a while."""
        self._slow[peer_id] = self.clock() + self.slow_for
        self._slow.move_to_end(peer_id)
        while len(self._slow) > self.max_peers:
            self._slow.popitem(last=False)

    def answered(self, peer_id: str) -> None:
        self._slow.pop(peer_id, None)

    # -- redirects -----------------------------------------------------------------------------

    def redirected(self, digest: str, holder: str) -> None:
        """containerd was sent to `holder` for `digest` (from some byte on)."""
        self._entry(digest).redirects.append((holder, self.clock()))

    def asked(self, digest: str, start: int) -> None:
        """containerd asks for `digest` from byte `start`. From 0, soon after redirects, it
        restarts a download that did not match: the holders it was sent to are to blame."""
        if start != 0:
            return
        known = self._digests.get(digest)
        if known is None or not known.redirects:
            return
        since = self.clock() - self.redirect_window
        holders = [h for h, when in known.redirects if when >= since]
        known.redirects.clear()
        self.failed_verification(digest, holders)

    def _entry(self, digest: str) -> _Digest:
        known = self._digests.get(digest)
        if known is None:
            known = self._digests[digest] = _Digest()
            while len(self._digests) > self.max_digests:
                self._digests.popitem(last=False)
        else:
            self._digests.move_to_end(digest)
        return known
