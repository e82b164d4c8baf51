"""Which node fetches a blob from upstream for the cluster: decided here, alike on every node
that knows the same members (why: README, "Upstream, once per cluster", 3 and 4).

The key hashed is the blob's digest or, for a blob of an image manifest this node fetched
lately, the manifest's: one node then fetches the whole image in order (`imageorder`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from shoal.fetch.imageorder import ImageParts, Images
from shoal.oci.digest import Digest
from shoal.routing.base import Peer

DOWN_FOR = 30.0


class Members(Protocol):
    def members(self) -> list[Peer]:
        """The other nodes this one knows."""
        ...


def designated(digest: Digest, candidates: list[Peer]) -> Peer:
    """Rendezvous (highest random weight) hashing: every node that knows the same members picks
    the same one, and a member joining or leaving moves only its own share of digests."""
    return max(candidates, key=lambda p: hashlib.sha256(f"{p.id}/{digest}".encode()).digest())


class Choice(NamedTuple):
    node: Peer | None  # None: this node fetches
    image: ImageParts | None  # the image the blob belongs to, when this node knows it


class Designation:
    def __init__(
        self,
        router: Members,
        me: Callable[[], Peer | None],
        images: Images | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`me`: this node (None while routing has no identity: then it fetches for itself);
        `images`: what images blobs belong to, when images are fetched in order."""
        self.router = router
        self.me = me
        self.images = images
        self.clock = clock
        self._down: dict[str, float] = {}  # peer ID -> until: found unreachable, passed over

    def unreachable(self, peer: Peer) -> None:
        """`peer` did not answer as the designated fetcher: the next node in the same order
        takes its place for DOWN_FOR seconds. Every node that finds it gone picks the same
        one, so a dead fetcher costs the cluster one more fetch, not one per node."""
        self._down[peer.id] = self.clock() + DOWN_FOR

    def of(self, key: Digest) -> Peer | None:
        """The node that fetches `key` for the cluster, or None when it is this one."""
        me = self.me()
        if me is None:
            return None
        now = self.clock()
        self._down = {p: t for p, t in self._down.items() if t > now}
        members = [p for p in self.router.members() if p.id != me.id and p.id not in self._down]
        chosen = designated(key, [me, *members])
        return None if chosen.id == me.id else chosen

    def for_blob(self, digest: Digest) -> Choice:
        image = None if self.images is None else self.images.image_of(digest)
        return Choice(self.of(digest if image is None else image.manifest), image)
