"""Who serves a blob to whom while a herd pulls it: a tree of bounded fan-out, grown by referral
(README, "A herd of hundreds").

The serving side (`Fanout`): a node sends one blob to at most `limit` peers at once. A peer that
asks beyond that is referred to the peers receiving it from this node right now (they serve
what they have received onward, holding back the end until it matched, as every in-flight
read does), so the herd grows a tree of `limit` children per node instead of a star. A node
never serves a blob to one of its own sources for it (the chain of nodes it receives the blob
through), which keeps the tree free of loops when nodes re-attach. A request marked as a
re-attach (its sender lost its source mid-blob and found every other node full) gets one spare
slot: a stranded subtree re-attaches at once instead of waiting for a slot.

The asking side (`Walk`): the order in which a puller asks nodes, following referrals
depth-first, never asking a node twice, and at most `max_hops` referrals deep; once every node
was full, it asks again as a re-attach.

Both are pure (no I/O, no clock): the daemon and the model in `bench/herd_model.py` run the
same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Fan-out per blob: 2 halves what each child gets of a node's uplink but keeps the tree
# log2(N) deep; 1 (chains) runs at the full link rate but is N deep; 0 means no bound (a star).
DEFAULT_FANOUT = 2
MAX_HOPS = 32
MAX_REFERRALS = 8  # named in one answer
MAX_UPSTREAM = 64  # ids of a blob's source chain kept and passed on


@dataclass(eq=False)  # by identity: two slots of one child for one blob are two streams
class Slot:
    """One downstream stream of one blob, held while the response is sent."""

    digest: str
    child: str
    _owner: Fanout | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._owner is not None:
            self._owner._release(self)
            self._owner = None


@dataclass(frozen=True)
class Answer:
    slot: Slot | None  # serve, holding this slot until the response ends
    referrals: tuple[str, ...] = ()  # else: ask these instead (empty: ask someone else)
    loop: bool = False  # refused because the asker is one of this node's sources for the blob


class Fanout:
    def __init__(self, limit: int = DEFAULT_FANOUT, spare: int = 1) -> None:
        """`limit` downstream streams per blob (0: unbounded); `spare` more for re-attaches."""
        self.limit = limit
        self.spare = spare
        self._children: dict[str, list[Slot]] = {}
        self._referred: dict[tuple[str, str], int] = {}  # (digest, child) -> times named

    def ask(
        self,
        digest: str,
        child: str,
        *,
        upstream: Iterable[str] = (),
        reattach: bool = False,
    ) -> Answer:
        """Whether to send `digest` to `child` now. `upstream`: the nodes this node receives
        the blob through (its source first), empty when it holds the blob or fetches it."""
        if child in upstream:
            return Answer(None, loop=True)
        slots = self._children.setdefault(digest, [])
        cap = self.limit + (self.spare if reattach else 0)
        if self.limit <= 0 or len(slots) < cap:
            slot = Slot(digest, child, self)
            slots.append(slot)
            return Answer(slot)
        return Answer(None, self._referrals(digest, slots, child))

    def children(self, digest: str) -> list[str]:
        return [s.child for s in self._children.get(digest, [])]

    def streams(self) -> int:
        return sum(len(s) for s in self._children.values())

    def _referrals(self, digest: str, slots: list[Slot], asker: str) -> tuple[str, ...]:
        # The least named first: later askers spread over the subtrees instead of all
        # descending into the first child's.
        ids = list(dict.fromkeys(s.child for s in slots if s.child != asker))
        ids.sort(key=lambda c: self._referred.get((digest, c), 0))
        named = tuple(ids[:MAX_REFERRALS])
        for c in named[:1]:
            self._referred[(digest, c)] = self._referred.get((digest, c), 0) + 1
        return named

    def _release(self, slot: Slot) -> None:
        slots = self._children.get(slot.digest)
        if slots is None:
            return
        try:
            slots.remove(slot)
        except ValueError:
            return
        if not slots:
            del self._children[slot.digest]
            for key in [k for k in self._referred if k[0] == slot.digest]:
                del self._referred[key]


class Walk:
    """The nodes a puller asks for one blob, in order: its candidates, then the referrals they
    answer with, depth-first; then, if all were full, every one again as a re-attach."""

    def __init__(self, candidates: Sequence[str], me: str, max_hops: int = MAX_HOPS) -> None:
        self.me = me
        self.max_hops = max_hops
        self.hops = 0
        self.reattach = False
        self._initial = [c for c in dict.fromkeys(candidates) if c != me]
        self._queue = list(self._initial)
        self._asked: set[str] = set()
        self._full: list[str] = []  # asked, full, in the order asked
        self._dead: set[str] = set()

    def next(self) -> str | None:
        """The next node to ask, or None when there is none left."""
        while self._queue:
            node = self._queue.pop(0)
            if node in self._dead or (node in self._asked and not self.reattach):
                continue
            self._asked.add(node)
            return node
        if not self.reattach and self._full:
            # Everyone was full: ask them again, now for a spare slot, nearest the root first.
            self.reattach = True
            self._queue = [n for n in dict.fromkeys(self._full) if n not in self._dead]
            self._asked = set()
            return self.next()
        return None

    def referred(self, by: str, to: Sequence[str]) -> None:
        """`by` was full and named `to`: ask those next."""
        self._full.append(by)
        if self.hops >= self.max_hops or self.reattach:
            return
        self.hops += 1
        fresh = [n for n in to if n != self.me and n not in self._asked and n not in self._dead]
        self._queue[:0] = fresh

    def failed(self, node: str) -> None:
        """`node` did not serve (no answer, a miss, a loop, bytes stopped): not asked again."""
        self._dead.add(node)

    def add(self, candidates: Iterable[str]) -> None:
        """More candidates learned meanwhile (asked after those known)."""
        for c in candidates:
            if c != self.me and c not in self._queue and c not in self._asked:
                self._queue.append(c)


def upstream_chain(source: str, its_upstream: Sequence[str]) -> tuple[str, ...]:
    """This node's sources for a blob received from `source`, which named `its_upstream`."""
    return (source, *its_upstream)[:MAX_UPSTREAM]
