"""One blob downloaded from other nodes: a sequence of holders, each with a progress deadline.

A holder whose body goes silent for `silence` seconds is probed on a second connection (a HEAD
of the same content, `probe_timeout` to answer): one that answers is alive and only waiting
(e.g. the designated fetcher, itself waiting for upstream bytes), and is waited for up to
`max_silence`; one that does not (stopped, hung, partitioned) is abandoned and the bytes
continue from the next holder with Range. A holder that breaks off is abandoned the same way.

The bytes are not verified here: whoever reads them hashes them (the spool, or the registry).
When they do not match, it says so (`Delivery.on_mismatch`), and the holders that sent them are
remembered (`holders.Holders`): the next download of the digest restarts from byte 0 elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from shoal import metrics
from shoal.content.model import Delivery, SourceKind
from shoal.herd.policy import Walk
from shoal.herd.serving import (
    LOOP_HEADER,
    REATTACH_HEADER,
    REFERRALS_HEADER,
    UPSTREAM_HEADER,
    Herd,
    parse_referrals,
    parse_upstream,
)
from shoal.oci.digest import Digest
from shoal.registry.protocol import peer_url
from shoal.routing.base import Peer
from shoal.sources.holders import Holders
from shoal.sources.liveness import from_live_peer

log = logging.getLogger("shoal.peers")

CHUNK = 1024 * 1024
ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError)


class Stalled(ConnectionError):
    pass


class Referred(Exception):
    """The holder sends the blob to as many peers as it may: ask `peers` instead."""

    def __init__(self, peers: list[Peer], loop: bool) -> None:
        super().__init__("referred")
        self.peers = peers
        self.loop = loop


@dataclass(frozen=True)
class Deadlines:
    header_timeout: float = 2.0  # a holder that has not answered by then is skipped
    silence: float = 2.0  # a body silent this long gets its holder probed
    probe_timeout: float = 2.0  # a probe unanswered this long: the holder is abandoned
    max_silence: float = 300.0  # even a live holder silent this long is abandoned
    # A holder that is not the designated fetcher has the blob or receives it from a peer; one
    # that lost its source refuses probes (shoal.herd), so its children leave at once. One
    # that still answers may wait on a blob queued at the fetcher behind others (a layer of
    # hundreds of MB takes seconds per hop), or, rarely, on nodes that attached to each other
    # through a chain not yet updated: past this, the latter is assumed.
    relay_silence: float = 120.0


class Link(Protocol):
    """What a download needs of its PeerSource: the HTTP session, deadlines, memory."""

    @property
    def session(self) -> aiohttp.ClientSession: ...

    @property
    def deadlines(self) -> Deadlines: ...

    @property
    def holders(self) -> Holders: ...

    @property
    def signer(self) -> RequestSigner: ...

    @property
    def herd(self) -> Herd | None: ...

    async def more_holders(self, digest: Digest) -> list[Peer]:
        """Holders of `digest` routing names now (a fresh lookup)."""
        ...


class RequestSigner(Protocol):
    """How requests to peers prove cluster membership (shoal.tenancy.signer.PeerSigner)."""

    def headers(self, method: str, path: str, ns: str | None, fetch: bool) -> dict[str, str]: ...

    def redirect_query(
        self, holder: str, path: str, ns: str | None, fetch: bool
    ) -> dict[str, str]: ...


@dataclass
class PeerDownload:
    """Not verified: a peer is never trusted. Another node serves it (`delivery().location`)."""

    link: Link
    digest: Digest
    peers: list[Peer]  # in the order to ask them
    url_path: str
    ns: str | None
    size: int
    fetch: bool = False  # asked of the peer as the cluster's designated fetcher
    patience: float | None = None  # for its answer, if not `header_timeout`
    source: SourceKind = SourceKind.PEER
    contributors: list[str] = field(default_factory=list)  # who sent the last read's bytes

    def delivery(self) -> Delivery:
        holder, path = self.peers[0], self._blob_path
        marks = self.link.signer.redirect_query(holder.id, path, self.ns, self.fetch)
        return Delivery(
            location=peer_url(holder.address, path, self.ns, marks),
            redirected=self._redirected,
            on_mismatch=self._mismatch,
        )

    def _redirected(self, start: int) -> None:
        self.link.holders.redirected(str(self.digest), self.peers[0].id)

    def _mismatch(self) -> None:
        metrics.HOLDERS_ABANDONED.labels("mismatch").inc()
        self.link.holders.failed_verification(str(self.digest), list(self.contributors))

    @property
    def _blob_path(self) -> str:
        # Peers serve any content they hold under /blobs/, with Range; manifests included.
        return self.url_path.replace("/manifests/", "/blobs/")

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end), resumed from the next holder with Range if one stalls or fails;
        a holder that is full names others (`shoal.herd`): they are asked next."""
        pos = start
        self.contributors = []
        last_error: BaseException | None = None
        herd = self.link.herd
        walk = Walk([p.id for p in self.peers], herd.me() if herd is not None else "")
        known = {p.id: p for p in self.peers}
        looked = False
        try:
            while pos < end:
                peer_id = walk.next()
                if peer_id is None and not looked:
                    # Every node known so far failed or was full: ask routing once more
                    # (nodes receiving the blob advertise it, so a stranded node finds them).
                    looked = True
                    fresh = await self.link.more_holders(self.digest)
                    known.update({p.id: p for p in fresh if p.id not in known})
                    walk.add(p.id for p in fresh)
                    peer_id = walk.next()
                if peer_id is None:
                    break
                peer = known[peer_id]
                try:
                    async for chunk in self._from(peer, pos, end, walk.reattach):
                        if not self.contributors or self.contributors[-1] != peer.id:
                            self.contributors.append(peer.id)
                        pos += len(chunk)
                        yield chunk
                    if pos >= end:
                        self.link.holders.answered(peer.id)
                        return
                    raise ConnectionError(f"peer {peer.address} ended the body at {pos} of {end}")
                except Referred as referred:
                    if referred.loop:
                        walk.failed(peer.id)
                    known.update({p.id: p for p in referred.peers if p.id not in known})
                    walk.referred(peer.id, [p.id for p in referred.peers])
                    metrics.HERD_FOLLOWED.labels("referral").inc()
                except ERRORS as exc:
                    last_error = exc
                    walk.failed(peer.id)
                    if herd is not None:
                        herd.detached(str(self.digest))
                    self.link.holders.slow(peer.id)
                    metrics.HOLDERS_ABANDONED.labels(
                        "silent" if isinstance(exc, Stalled) else "failed"
                    ).inc()
                    log.warning("peer %s failed at byte %d of %s: %s; trying the next",
                                peer.address, pos, self.digest, exc)  # fmt: skip
        finally:
            # Cut short, the node stays between sources (it refuses peers) until its fetch
            # found the rest (shoal.herd: the rescue) or gave up.
            if herd is not None and pos >= end:
                herd.received(str(self.digest))
        if pos < end:
            raise ConnectionError(f"no peer served {self.digest} past byte {pos}: {last_error}")

    async def _from(
        self, peer: Peer, pos: int, end: int, reattach: bool = False
    ) -> AsyncIterator[bytes]:
        """Bytes [pos, end) from `peer`, as they come; raises when it stalls or fails, and
        `Referred` when it is full."""
        # Only the designated fetcher is asked to fetch; the nodes it refers to relay.
        fetch = self.fetch and peer.id == self.peers[0].id
        headers = self.link.signer.headers("GET", self._blob_path, self.ns, fetch)
        if pos > 0 or end < self.size:
            headers["Range"] = f"bytes={pos}-{end - 1}"
        if reattach:
            headers[REATTACH_HEADER] = "1"
            metrics.HERD_FOLLOWED.labels("reattach").inc()
        url = peer_url(peer.address, self._blob_path, self.ns)
        d = self.link.deadlines
        request = self.link.session.get(url, headers=headers)
        if fetch and self.patience is not None:  # patient only while the fetcher is alive
            resp = await from_live_peer(request, self.link.session, peer, d, self.patience)
        else:
            async with asyncio.timeout(d.header_timeout):
                resp = await request
        try:
            if resp.status == 429 and REFERRALS_HEADER in resp.headers:
                raise Referred(
                    parse_referrals(resp.headers.get(REFERRALS_HEADER)),
                    resp.headers.get(LOOP_HEADER) == "1",
                )
            if resp.status not in (200, 206) or (pos > 0 and resp.status != 206):
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message="peer refused"
                )
            herd, first = self.link.herd, True
            while pos < end:
                chunk = await self._next(resp, peer, d.max_silence if fetch else d.relay_silence)
                if not chunk:
                    return
                if first and herd is not None:
                    # Attached once bytes flow, not on headers: nodes stranded together answer
                    # each other's headers at once, and would otherwise wait on each other.
                    first = False
                    upstream = parse_upstream(resp.headers.get(UPSTREAM_HEADER))
                    herd.receiving(str(self.digest), peer.id, upstream)
                chunk = chunk[: end - pos]
                pos += len(chunk)
                yield chunk
        finally:
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()  # never reuse a connection whose body was not read to the end

    async def _next(self, resp: aiohttp.ClientResponse, peer: Peer, limit: float) -> bytes:
        """The next piece of the body (b"" at its end), waiting only while `peer` is alive."""
        d = self.link.deadlines
        silent = 0.0
        while True:
            # No task per piece (this runs for every few KiB a peer sends): a read cancelled
            # while it waits has taken nothing from the buffer, so the next one loses nothing.
            try:
                async with asyncio.timeout(d.silence):
                    return await resp.content.read(CHUNK)
            except TimeoutError:
                pass
            silent += d.silence
            if silent >= limit:
                raise Stalled(f"peer {peer.address} sent nothing for {silent:.0f}s")
            if not await self._alive(peer):
                raise Stalled(f"peer {peer.address} went silent and does not answer")

    async def _alive(self, peer: Peer) -> bool:
        """Whether `peer` answers a HEAD for this content at once (on its own connection)."""
        url = peer_url(peer.address, self._blob_path, self.ns)
        try:
            async with asyncio.timeout(self.link.deadlines.probe_timeout):
                headers = self.link.signer.headers("HEAD", self._blob_path, self.ns, False)
                async with self.link.session.head(url, headers=headers) as resp:
                    return resp.status == 200
        except ERRORS:
            return False
