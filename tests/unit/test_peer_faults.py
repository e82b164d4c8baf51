"""Bad, slow and dead holders cost a pull at most one failed attempt: a holder that stops is
abandoned (after a probe) and the blob continues from another with Range; bytes that fail
verification restart from byte 0 elsewhere, and their holder is not asked again."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from shoal import metrics
from shoal.integrity.guard import Integrity
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.routing import Peer
from shoal.sources.holders import Holders
from shoal.sources.local import LocalSource
from shoal.sources.peers import PeerSource
from tests.fakes.images import LAYER, NS
from tests.fakes.signing import signer
from tests.fakes.store import FileStore
from tests.unit.peer_cluster import Cluster, get

DIGEST = Digest.of(LAYER)
PATH = f"/v2/team/app/blobs/{DIGEST}"
REF = Reference(registry=None, repository="team/app")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    await c.close()


@dataclass
class FakeHolder:
    """A holder's shoal as seen from outside: serves `data` (maybe wrong) with Range, and can
    stop (a SIGSTOPped process: nothing answers) or pause (alive: HEAD still answers)."""

    data: bytes = LAYER
    stop_after: int | None = None  # bytes of a body sent before the process stops
    pause_after: int | None = None  # bytes of a body sent before a pause of `pause` seconds
    pause: float = 0.0
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    gets: list[str | None] = field(default_factory=list)  # Range of every GET
    heads: int = 0
    requests: int = 0  # also those it never answered

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.stopped.is_set():
            await asyncio.Event().wait()  # stopped: never answers
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
        body = self.data[start:]
        status = 206 if match else 200
        headers = {"Content-Length": str(len(body))}
        if match:
            headers["Content-Range"] = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        if request.method == "HEAD":
            self.heads += 1
            return web.Response(status=status, headers=headers)
        self.gets.append(request.headers.get("Range"))
        resp = web.StreamResponse(status=status)
        resp.content_length = len(body)
        await resp.prepare(request)
        for stop, hold in ((self.stop_after, None), (self.pause_after, self.pause)):
            if stop is not None and stop < len(body):
                await resp.write(body[:stop])
                if hold is None:
                    self.stopped.set()
                    await asyncio.Event().wait()
                await asyncio.sleep(hold)
                body = body[stop:]
        await resp.write(body)
        await resp.write_eof()
        return resp


async def holder_node(cluster: Cluster, name: str, holder: FakeHolder) -> Peer:
    _, router = await cluster.node(name, app=holder.app())
    await router.advertise([str(DIGEST)])
    return router.peer


@dataclass
class Pull:
    failed_attempts: int
    data: bytes | None


async def pull_like_containerd(url: str, attempts: int = 3) -> Pull:
    """containerd's blob download: resumed with Range after a cut for as long as it makes
    progress, hashed at the end; a mismatch fails the attempt, and the next starts from 0."""
    failed = 0
    async with aiohttp.ClientSession() as session:
        for _ in range(attempts):
            got = bytearray()
            while True:
                headers = {"Range": f"bytes={len(got)}-"} if got else {}
                before = len(got)
                try:
                    async with session.get(url, headers=headers) as resp:
                        if resp.status not in (200, 206):
                            break
                        async for chunk in resp.content.iter_chunked(1 << 20):
                            got += chunk
                    break
                except aiohttp.ClientPayloadError:
                    if len(got) == before:
                        break
            if hashlib.sha256(got).hexdigest() == DIGEST.hex and len(got) == len(LAYER):
                return Pull(failed, bytes(got))
            failed += 1
    return Pull(failed, None)


@pytest.mark.parametrize("spooled", [True, False], ids=["relay through the spool", "streamed"])
async def test_a_holder_that_stops_mid_body_is_abandoned_and_another_continues(
    cluster: Cluster, spooled: bool
) -> None:
    stopper = FakeHolder(stop_after=1_000_000)
    good = FakeHolder()
    await holder_node(cluster, "stopper", stopper)
    await holder_node(cluster, "good", good)
    b, _ = await cluster.node("b", spooled=spooled)
    pull = await asyncio.wait_for(pull_like_containerd(str(b.make_url(PATH))), 60)
    assert pull == Pull(0, LAYER)
    assert stopper.gets == [None]  # asked first (advertised first, answered first)
    assert len(good.gets) == 1 and good.gets[0] is not None  # resumed after the stall, not from 0
    assert int(good.gets[0].removeprefix("bytes=").split("-")[0]) >= 1_000_000


async def test_a_live_holder_that_waits_is_waited_for(cluster: Cluster) -> None:
    """A pause longer than the silence deadline, from a holder that still answers: e.g. the
    designated fetcher waiting for upstream. It is not abandoned."""
    waiter = FakeHolder(pause_after=1_000_000, pause=1.5)
    other = FakeHolder()
    await holder_node(cluster, "waiter", waiter)
    await holder_node(cluster, "other", other)
    b, _ = await cluster.node("b", spooled=True)
    assert await pull_like_containerd(str(b.make_url(PATH))) == Pull(0, LAYER)
    assert waiter.gets == [None] and other.gets == []
    assert waiter.heads >= 2  # the HEAD that chose it, and at least one probe


@pytest.mark.parametrize("spooled", [True, False], ids=["relay through the spool", "streamed"])
async def test_wrong_bytes_cost_one_attempt_and_their_holder_is_not_asked_again(
    cluster: Cluster, spooled: bool
) -> None:
    bad = bytearray(LAYER)
    bad[100] ^= 1
    liar = FakeHolder(bytes(bad))
    good = FakeHolder()
    await holder_node(cluster, "liar", liar)
    await holder_node(cluster, "good", good)
    b, _ = await cluster.node("b", spooled=spooled)
    pull = await pull_like_containerd(str(b.make_url(PATH)))
    assert pull == Pull(1, LAYER)
    assert len(liar.gets) == 1  # never asked again for this digest
    status, body, _ = await get(str(b.make_url(PATH)))  # and later requests go elsewhere too
    assert status == 200 and body == LAYER and len(liar.gets) == 1


async def test_a_holder_that_finds_its_copy_rotted_quarantines_it_and_the_blob_restarts(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The bit-rot case: the holder served the blob once intact (its record is warm), then one
    byte of its file flipped. It hashes again (the file's identity moved), cuts near the end,
    quarantines; the puller resumed from the good holder, so its first attempt fails; the
    second starts from byte 0 and must not touch the bad holder."""
    (tmp_path / "rot").mkdir()
    store = FileStore(tmp_path / "rot")
    store.add(LAYER)
    guard = Integrity()
    rotted, router = await cluster.node("rotted", local=LocalSource(store, guard))
    await router.advertise([str(DIGEST)])
    assert (await get(str(rotted.make_url(PATH))))[1] == LAYER  # served once intact
    good = FakeHolder()
    await holder_node(cluster, "good", good)
    path = tmp_path / "rot" / DIGEST.hex
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 1
    path.write_bytes(bytes(data))
    b, _ = await cluster.node("b", spooled=True)
    before = metrics.QUARANTINED.labels("serving")._value.get()
    pull = await pull_like_containerd(str(b.make_url(PATH)))
    assert pull == Pull(1, LAYER)
    assert metrics.QUARANTINED.labels("serving")._value.get() == before + 1
    marks = signer("peer").headers("HEAD", PATH, None, False)
    peer_head = await get(str(rotted.make_url(PATH)), marks, method="HEAD")
    assert peer_head[0] == 404  # what peers see now
    assert good.gets[-1] is None  # the second attempt came from byte 0, from the good copy


async def test_redirected_containerd_back_from_zero_is_sent_elsewhere(cluster: Cluster) -> None:
    bad = bytearray(LAYER)
    bad[-1] ^= 1
    liar = FakeHolder(bytes(bad))
    good = FakeHolder()
    liar_peer = await holder_node(cluster, "liar", liar)
    good_peer = await holder_node(cluster, "good", good)
    b, _ = await cluster.node("b", redirect=True)
    url = str(b.make_url(f"{PATH}?ns={NS}"))
    _, _, first = await get(url, follow=False)
    assert URL(first["Location"]).port == int(liar_peer.address.rsplit(":", 1)[1])
    await get(first["Location"])  # containerd downloads it there: wrong bytes, commit fails
    _, _, again = await get(url, follow=False)  # its next attempt starts from byte 0
    assert URL(again["Location"]).port == int(good_peer.address.rsplit(":", 1)[1])
    # A resume (with Range) is no such sign: the holder just broke off.
    _, _, resumed = await get(url, {"Range": "bytes=5-"}, follow=False)
    assert URL(resumed["Location"]).port == int(good_peer.address.rsplit(":", 1)[1])


async def test_a_holder_that_does_not_answer_is_asked_last_for_a_while(cluster: Cluster) -> None:
    silent = FakeHolder()
    silent.stopped.set()
    good = FakeHolder()
    await holder_node(cluster, "silent", silent)  # first in the provider list
    await holder_node(cluster, "good", good)
    b, _ = await cluster.node("b", spooled=True)
    for _ in range(3):
        assert await pull_like_containerd(str(b.make_url(PATH))) == Pull(0, LAYER)
        for spool in cluster.spools:  # each pull a fresh download
            for fetch in list(spool.fetches.values()):
                spool._drop(fetch)
    assert len(good.gets) == 3
    assert silent.requests == 1  # asked by the first pull only: then last, after the good one


async def test_a_relayed_blob_is_downloaded_once_per_node_and_shared_while_it_arrives(
    cluster: Cluster,
) -> None:
    slow = FakeHolder(pause_after=1_000_000, pause=1.0)  # alive throughout
    await holder_node(cluster, "holder", slow)
    b, b_router = await cluster.node("b", spooled=True)
    url = str(b.make_url(PATH))
    pulls = [asyncio.ensure_future(pull_like_containerd(url)) for _ in range(2)]
    await until(lambda: bool(slow.gets))
    # Advertised while it arrives: other nodes can fetch from this one too.
    await until(lambda: b_router.peer.id in cluster.net.providers.get(str(DIGEST), {}))
    assert slow.gets == [None]  # still arriving
    assert await asyncio.gather(*pulls) == [Pull(0, LAYER), Pull(0, LAYER)]
    assert slow.gets == [None]  # one download for both


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - polling another component's state
            await asyncio.sleep(0.01)


def test_holders_order_bad_never_suspects_last_and_slow_late() -> None:
    now = [0.0]
    holders = Holders(slow_for=10.0, clock=lambda: now[0])
    a, b, c, d = (Peer(n, f"10.0.0.{i}:1") for i, n in enumerate("abcd"))
    key = str(DIGEST)
    assert holders.order(key, [a, b, c, d]) == [a, b, c, d]
    holders.failed_verification(key, ["a"])  # alone: bad
    assert holders.order(key, [a, b, c, d]) == [b, c, d]
    holders.failed_verification(key, ["b", "c"])  # stitched: suspects, b (the start) last
    assert holders.order(key, [a, b, c, d]) == [d, c, b]
    assert holders.order("sha256:other", [a, b]) == [a, b]  # per digest
    holders.slow("d")
    assert holders.order("sha256:other", [d, a]) == [a, d]
    now[0] = 11.0
    assert holders.order("sha256:other", [d, a]) == [d, a]  # forgotten after a while


def test_a_restart_from_zero_soon_after_redirects_blames_their_holders() -> None:
    now = [0.0]
    holders = Holders(redirect_window=60.0, clock=lambda: now[0])
    a, b = Peer("a", "10.0.0.1:1"), Peer("b", "10.0.0.2:1")
    key = str(DIGEST)
    holders.asked(key, 0)
    holders.redirected(key, "a")
    holders.asked(key, 5000)  # a resume: no blame
    holders.redirected(key, "b")
    assert holders.order(key, [a, b]) == [a, b]
    holders.asked(key, 0)
    assert holders.order(key, [a, b]) == [b, a]  # both suspects, a (the start) last
    holders.redirected(key, "b")
    now[0] = 100.0  # too long ago to tell
    holders.asked(key, 0)
    assert holders.order(key, [a, b]) == [b, a]


async def test_a_lookup_still_walking_does_not_hold_up_a_request_once_a_holder_is_known(
    cluster: Cluster,
) -> None:
    """A walk waiting on a stopped node (its query deadline) must not delay every request:
    once one holder is known, the request goes ahead with it."""
    good = FakeHolder()
    peer = await holder_node(cluster, "good", good)

    class Walking:
        async def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]:
            yield peer
            await asyncio.Event().wait()  # still asking a node that does not answer

    source = PeerSource(Walking(), signer=signer())
    try:
        blob = await asyncio.wait_for(source.find(REF, DIGEST, "blob"), 30)
        assert blob is not None and blob.size == len(LAYER)
    finally:
        await source.close()
