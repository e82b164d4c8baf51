"""This node's part in a herd: how many peers it sends each blob to right now, whom it refers the
others to, and, for blobs it receives from peers, which nodes they come through.

Only requests signed by a peer's shoal count (`shoal.tenancy.admission`); this node's containerd
and containerd of a node redirected here (a capability, no sender) are always served, since
a refusal would send containerd to the registry. Blobs under `min_size` are never refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from aiohttp import web

from shoal import metrics
from shoal.herd.policy import DEFAULT_FANOUT, Fanout, Slot, upstream_chain
from shoal.oci.errors import error_body
from shoal.registry.protocol import FETCH_HEADER
from shoal.routing.base import Peer

REFERRALS_HEADER = "X-Shoal-Referrals"  # "<id> <host:port>, ..." ask these instead
UPSTREAM_HEADER = "X-Shoal-Upstream"  # "<id> <id> ..." the nodes the blob comes through here
REATTACH_HEADER = "X-Shoal-Reattach"  # the asker found every node full: a spare slot
LOOP_HEADER = "X-Shoal-Loop"  # refused: the asker is one of this node's sources for the blob
MIN_SIZE = 1024 * 1024
DETACHED_FOR = 30.0  # at most this long between sources before peers are served again


class Herd:
    def __init__(
        self,
        members: Callable[[], list[Peer]],
        fanout: int = DEFAULT_FANOUT,
        min_size: int = MIN_SIZE,
        me: Callable[[], str] = lambda: "",
    ) -> None:
        """`members`: the nodes this one knows (a referral names only those, by address);
        `me`: this node's ID."""
        self.members = members
        self.me = me
        self.fanout = Fanout(fanout)
        self.min_size = min_size
        self._upstream: dict[str, tuple[str, ...]] = {}
        # Blobs whose source was lost, another not yet found: digest -> since (monotonic).
        self._detached: dict[str, float] = {}

    # -- the receiving side ------------------------------------------------------------------

    def receiving(self, digest: str, source: str, its_upstream: Iterable[str]) -> None:
        """This node now receives `digest` from `source`, which receives it through
        `its_upstream` (empty when it holds it or fetches it upstream)."""
        self._upstream[digest] = upstream_chain(source, tuple(its_upstream))
        self._detached.pop(digest, None)

    def detached(self, digest: str) -> None:
        """This node lost its source of `digest` and looks for another: meanwhile it serves
        the blob to no peer and answers their probes with a refusal, so nodes waiting on it
        move on instead of waiting on a node that waits itself (two stranded nodes would
        otherwise attach to each other and wait forever)."""
        self._detached[digest] = time.monotonic()

    def received(self, digest: str) -> None:
        """Done with peers for `digest`: it arrived, or this node now fetches it upstream."""
        self._upstream.pop(digest, None)
        self._detached.pop(digest, None)

    def is_detached(self, digest: str) -> bool:
        since = self._detached.get(digest)
        if since is None:
            return False
        if time.monotonic() - since > DETACHED_FOR:  # a rescue that never reported back
            del self._detached[digest]
            return False
        return True

    def upstream(self, digest: str) -> tuple[str, ...]:
        return self._upstream.get(digest, ())

    # -- the serving side --------------------------------------------------------------------

    def admit(
        self, request: web.Request, digest: str, size: int, sender: str | None
    ) -> Slot | None:
        """A slot to send `digest` to the asker, or None when the asker is not one whose
        streams count (then it is served without one). Raises `Refer` when full."""
        if sender is None:
            return None
        if FETCH_HEADER not in request.headers and self.is_detached(digest):
            metrics.HERD_REFUSED.labels("detached").inc()
            raise Refer([], loop=True)
        if request.method != "GET" or self.fanout.limit <= 0 or size < self.min_size:
            return None
        answer = self.fanout.ask(
            digest, sender,
            upstream=self.upstream(digest),
            reattach=request.headers.get(REATTACH_HEADER) == "1",
        )  # fmt: skip
        metrics.HERD_STREAMS.set(self.fanout.streams())
        if answer.slot is not None:
            return answer.slot
        known = {p.id: p.address for p in self.members()}
        named = [f"{c} {known[c]}" for c in answer.referrals if c in known]
        metrics.HERD_REFUSED.labels("loop" if answer.loop else "full").inc()
        raise Refer(named, answer.loop)

    def release(self, slot: Slot | None) -> None:
        if slot is not None:
            slot.release()
            metrics.HERD_STREAMS.set(self.fanout.streams())

    def headers(self, digest: str) -> dict[str, str]:
        """What a response to a peer says about where the blob comes from on this node."""
        chain = self.upstream(digest)
        return {UPSTREAM_HEADER: " ".join(chain)} if chain else {}


class Refer(Exception):
    """Full (or a loop): answered 429 with the peers to ask instead."""

    def __init__(self, referrals: list[str], loop: bool) -> None:
        super().__init__("this node sends the blob to as many peers as it may")
        self.referrals = referrals
        self.loop = loop

    def response(self) -> web.Response:
        headers = {"Content-Type": "application/json", REFERRALS_HEADER: ", ".join(self.referrals)}
        if self.loop:
            headers[LOOP_HEADER] = "1"
        body = error_body("TOOMANYREQUESTS", str(self), {"referrals": len(self.referrals)})
        return web.Response(status=429, body=body, headers=headers)


def parse_referrals(value: str | None) -> list[Peer]:
    """The peers a 429 named, as `Peer`s; malformed entries are skipped."""
    peers: list[Peer] = []
    for entry in (value or "").split(","):
        parts = entry.split()
        if len(parts) == 2 and ":" in parts[1]:
            peers.append(Peer(parts[0], parts[1]))
    return peers[:16]


def parse_upstream(value: str | None) -> tuple[str, ...]:
    return tuple((value or "").split())[:64]
