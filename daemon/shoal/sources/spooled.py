"""Peers' blobs read through this node's spool (`--peer-transfer relay`, the default).

The local shoal downloads a blob a peer holds into its own spool entry: single flight per digest
on this node, advertised while it arrives so other nodes can fetch from this one too, hashed as
written, and served to containerd by sendfile as the bytes land, the end held back until the
digest matched (`shoal.fetch.spool`), exactly as upstream fetches are. The download itself is a
`download.PeerDownload`: holders under progress deadlines, resumed from the next one with
Range. A download that does not match is dropped, its holders remembered, and the next request
starts it again from byte 0 elsewhere or upstream. Manifests are read whole and verified by the
registry, and blobs containerd is redirected for (`--peer-transfer redirect`) never arrive here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from shoal.content.model import Blob, ContentKind, Descriptor, SourceKind
from shoal.fetch.sharing import SharedFetches
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.registry.protocol import Asker
from shoal.registry.transfer import PeerTransfer
from shoal.routing.base import Peer


class Peers(Protocol):
    """What the spooled source asks of shoal.sources.peers.PeerSource."""

    async def resolve(self, ref: Reference) -> Descriptor | None: ...

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None: ...

    async def fetch_at(
        self, peer: Peer, ref: Reference, digest: Digest, kind: ContentKind
    ) -> Blob | None: ...


class SpooledPeers:
    name = SourceKind.PEER

    def __init__(self, peers: Peers, sharing: SharedFetches, transfer: PeerTransfer) -> None:
        self.peers = peers
        self.sharing = sharing
        self.transfer = transfer
        # Where a peer download that lost every holder continues: the cluster's fetcher
        # (`UpstreamFetcher.rescue`), set once it exists.
        self.rescue: Callable[[Reference, Digest], Awaitable[Blob | None]] | None = None

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return await self.peers.resolve(ref)

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        return await self._through(ref, digest, kind, await self.peers.find(ref, digest, kind))

    async def fetch_at(
        self, peer: Peer, ref: Reference, digest: Digest, kind: ContentKind
    ) -> Blob | None:
        """From the node chosen to fetch `digest` for the cluster, through the spool too."""
        blob = await self.peers.fetch_at(peer, ref, digest, kind)
        return await self._through(ref, digest, kind, blob)

    async def _through(
        self, ref: Reference, digest: Digest, kind: ContentKind, blob: Blob | None
    ) -> Blob | None:
        if blob is None or kind != "blob" or self.transfer.redirects(blob.size, Asker.CONTAINERD):
            return blob
        rescue = self.rescue

        async def rest(pos: int) -> Blob | None:
            return None if rescue is None else await rescue(ref, digest)

        return await self.sharing.copy(digest, blob, rest)
