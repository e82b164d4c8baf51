"""A herd pulling one blob at once through real shoal apps (in-memory router, spooled relay):
no node sends it to more than `fanout` peers at a time, the others are referred to nodes still
receiving it, which pass it on; a node that dies mid-blob costs its downstream a re-attach."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal.herd.serving import Herd, parse_referrals
from shoal.oci.digest import Digest
from tests.fakes.store import MemoryStore
from tests.unit.peer_cluster import Cluster, get

LAYER = os.urandom(6 * 1024 * 1024)
DIGEST = Digest.of(LAYER)
PATH = f"/v2/team/app/blobs/{DIGEST}"


class SlowStore(MemoryStore):
    """A holder whose uplink is slow: 256 KiB every 40 ms (about 1 s for the layer)."""

    async def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        data = self.blobs[digest]
        for pos in range(start, end, 256 * 1024):
            await asyncio.sleep(0.04)
            yield data[pos : min(end, pos + 256 * 1024)]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    await c.close()


async def watch_peak(herds: dict[str, Herd], peaks: dict[str, int]) -> None:
    while True:
        for name, herd in herds.items():
            peaks[name] = max(peaks.get(name, 0), len(herd.fanout.children(str(DIGEST))))
        await asyncio.sleep(0.005)


async def herd_of(cluster: Cluster, pullers: int, fanout: int) -> list[str]:
    store = SlowStore()
    store.add(LAYER)
    _, router = await cluster.node("holder", store, fanout=fanout)
    await router.advertise([str(DIGEST)])
    urls = []
    for i in range(pullers):
        server, _ = await cluster.node(f"p{i}", spooled=True, fanout=fanout)
        urls.append(str(server.make_url(PATH)))
    return urls


@pytest.mark.parametrize("fanout", [1, 2])
async def test_no_node_sends_a_blob_to_more_than_fanout_peers_and_everyone_gets_it(
    cluster: Cluster, fanout: int
) -> None:
    urls = await herd_of(cluster, 5, fanout)
    peaks: dict[str, int] = {}
    watcher = asyncio.ensure_future(watch_peak(cluster.herds, peaks))
    try:
        answers = await asyncio.gather(*(get(u) for u in urls))
    finally:
        watcher.cancel()
    assert [(status, body == LAYER) for status, body, _ in answers] == [(200, True)] * 5
    assert max(peaks.values()) <= fanout, peaks
    # The holder alone could not have served five at once: others passed it on.
    assert sum(1 for name, peak in peaks.items() if peak > 0 and name != "holder") >= 1, peaks


async def test_without_a_bound_the_holder_serves_everyone_itself(cluster: Cluster) -> None:
    """Today's star, for contrast: the reference the bound above is measured against."""
    urls = await herd_of(cluster, 4, 0)
    before = len(cluster.lookups)
    answers = await asyncio.gather(*(get(u) for u in urls))
    assert all(status == 200 and body == LAYER for status, body, _ in answers)
    assert len(cluster.lookups) > before


async def test_a_full_node_answers_429_in_oci_json_naming_its_children(cluster: Cluster) -> None:
    store = SlowStore()
    store.add(LAYER)
    holder, router = await cluster.node("holder", store, fanout=1)
    await router.advertise([str(DIGEST)])
    first, _ = await cluster.node("p0", spooled=True, fanout=1)
    pulling = asyncio.ensure_future(get(str(first.make_url(PATH))))
    herd = cluster.herds["holder"]
    for _ in range(200):
        if herd.fanout.children(str(DIGEST)):
            break
        await asyncio.sleep(0.01)
    from tests.fakes.signing import signer

    marks = signer("someone").headers("GET", PATH, None, False)
    status, body, headers = await get(str(holder.make_url(PATH)), marks)
    assert status == 429
    assert b'"code":"TOOMANYREQUESTS"' in body
    assert [p.id for p in parse_referrals(headers.get("X-Shoal-Referrals"))] == ["p0"]
    status, body, _ = await pulling
    assert status == 200 and body == LAYER


async def test_a_relaying_node_that_dies_costs_its_downstream_a_reattach(cluster: Cluster) -> None:
    """Chain holder -> p0 -> p1; p0's server goes away mid-blob: p1 re-attaches (to the holder,
    whose one slot p0 freed, or its spare) and gets the whole blob right."""
    store = SlowStore()
    store.add(LAYER)
    _, router = await cluster.node("holder", store, fanout=1)
    await router.advertise([str(DIGEST)])
    p0, _ = await cluster.node("p0", spooled=True, fanout=1)
    p1, _ = await cluster.node("p1", spooled=True, fanout=1)
    first = asyncio.ensure_future(get(str(p0.make_url(PATH))))
    for _ in range(200):
        if cluster.herds["holder"].fanout.children(str(DIGEST)):
            break
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(get(str(p1.make_url(PATH))))
    herd0 = cluster.herds["p0"]
    for _ in range(300):
        if herd0.fanout.children(str(DIGEST)) == ["p1"]:
            break
        await asyncio.sleep(0.01)
    assert herd0.fanout.children(str(DIGEST)) == ["p1"]  # p1 was referred to p0
    await cluster.servers[1].close()  # p0 goes away
    first.cancel()
    status, body, _ = await second
    assert status == 200 and body == LAYER


async def test_a_node_between_sources_refuses_peers_so_they_do_not_wait_on_it(
    cluster: Cluster,
) -> None:
    """Two stranded nodes that attached to each other would wait forever: while a node looks
    for a new source of a blob, peers asking it for the blob (and probing it) are refused."""
    store = SlowStore()
    store.add(LAYER)
    holder, router = await cluster.node("holder", store, fanout=2)
    await router.advertise([str(DIGEST)])
    from tests.fakes.signing import signer

    herd = cluster.herds["holder"]
    herd.detached(str(DIGEST))
    for method in ("HEAD", "GET"):
        marks = signer("someone").headers(method, PATH, None, False)
        status, _, headers = await get(str(holder.make_url(PATH)), marks, method=method)
        assert (status, headers.get("X-Shoal-Loop")) == (429, "1")
    status, body, _ = await get(str(holder.make_url(PATH)))  # its own containerd is served
    assert status == 200 and body == LAYER
    herd.receiving(str(DIGEST), "elsewhere", ())
    marks = signer("someone").headers("HEAD", PATH, None, False)
    assert (await get(str(holder.make_url(PATH)), marks, method="HEAD"))[0] == 200


def test_a_designated_fetcher_found_unreachable_is_passed_over_alike_everywhere() -> None:
    from shoal.fetch.designate import Designation
    from shoal.routing import Peer

    peers = [Peer(f"n{i}", f"10.0.0.{i}:1") for i in range(6)]

    class Members:
        def __init__(self, me: Peer) -> None:
            self.me = me

        def members(self) -> list[Peer]:
            return [p for p in peers if p != self.me]

    now = [0.0]
    views = [Designation(Members(p), lambda p=p: p, None, clock=lambda: now[0]) for p in peers]
    first = {v.of(DIGEST) or v.me() for v in views}
    assert len(first) == 1
    dead = first.pop()
    assert dead is not None
    for view in views:
        if view.me() != dead:
            view.unreachable(dead)
    second = {v.of(DIGEST) or v.me() for v in views if v.me() != dead}
    assert len(second) == 1 and dead not in second  # one new fetcher, the same for all
    now[0] += 31.0  # it may be back: asked again
    assert {v.of(DIGEST) or v.me() for v in views if v.me() != dead} == {dead}
