"""The status page's facts: every answer recorded once, with where its bytes came from (and which
peer), bytes by source per minute, and the page and JSON that show them."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal import metrics
from shoal.content.model import STREAMED, Delivery, SourceKind
from shoal.observe.facts import NodeParts, status
from shoal.observe.middleware import RegistryLabels
from shoal.observe.page import render
from shoal.observe.recorder import MINUTES, LastProblem, Pull, Recorder
from shoal.observe.routes import add_status_routes
from shoal.observe.timing import TimedLookup, TimedTags
from shoal.oci.digest import Digest
from shoal.oci.names import make_reference
from shoal.registry.app import make_app
from shoal.registry.transfer import PeerTransfer
from shoal.routing import Peer
from shoal.routing.base import NodeInfo
from shoal.sources.chain import SourceChain
from shoal.sources.download import Deadlines
from shoal.sources.local import LocalSource
from shoal.sources.peers import PeerSettings, PeerSource
from tests.fakes.images import LAYER, NS, build_image
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.fakes.signing import admission, signer
from tests.fakes.store import MemoryStore


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Node:
    def __init__(self, server: TestServer, router: MemoryRouter, recorder: Recorder) -> None:
        self.server, self.router, self.recorder = server, router, recorder

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


class Nodes:
    """Nodes on one in-memory network, each with its own recorder."""

    def __init__(self) -> None:
        self.net = MemoryNetwork()
        self.nodes: list[Node] = []

    async def add(self, name: str, store: MemoryStore, redirect: bool = False) -> Node:
        holder: dict[str, MemoryRouter] = {}

        class Late:  # the router exists only once the server has its port
            def lookup(self, key: str, limit: int = 3) -> AsyncIterator[Peer]:
                return holder["r"].lookup(key, limit)

        recorder = Recorder()
        peers = PeerSource(
            Late(),
            PeerSettings(hedge_after=0.1, deadlines=Deadlines(header_timeout=1.0)),
            signer=signer(name),
        )
        local = LocalSource(store)
        app = make_app(
            SourceChain([local, peers], [local]),
            transfer=PeerTransfer(redirect=redirect, redirect_min=1024),
            recorder=recorder,
            admission=admission(name),
        )
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        holder["r"] = router = MemoryRouter(self.net, Peer(name, f"127.0.0.1:{server.port}"))
        await router.start()
        node = Node(server, router, recorder)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.server.close()


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    n = Nodes()
    yield n
    await n.close()


async def _holder_and_puller(nodes: Nodes, redirect: bool) -> tuple[Node, Node, dict]:
    store = MemoryStore()
    image = build_image(store)
    holder = await nodes.add("holder", store)
    puller = await nodes.add("puller", MemoryStore(), redirect=redirect)
    await holder.router.advertise([str(image["mdig"]), str(image["ldig"]), f"{NS}/team/app:v1"])
    return holder, puller, image


async def test_a_relayed_pull_is_recorded_as_peer_on_the_puller_and_local_on_the_holder(
    nodes: Nodes,
) -> None:
    holder, puller, image = await _holder_and_puller(nodes, redirect=False)
    async with aiohttp.ClientSession() as session:
        base = f"http://{puller.address}/v2/team/app"
        async with session.get(f"{base}/manifests/v1", params={"ns": NS}) as resp:
            assert resp.status == 200
        async with session.get(f"{base}/blobs/{image['ldig']}", params={"ns": NS}) as resp:
            assert await resp.read() == LAYER
    blob, manifest = puller.recorder.recent(2)
    assert (blob.kind, blob.source, blob.peer, blob.bytes) == (
        "blob", "peer", holder.address, len(LAYER),
    )  # fmt: skip
    assert blob.asker == "containerd" and blob.complete and blob.reference == str(image["ldig"])
    assert (manifest.kind, manifest.source, manifest.peer) == ("manifest", "peer", holder.address)
    assert manifest.reference == "v1" and manifest.registry == NS
    assert puller.recorder.totals["peer"] == len(LAYER) + len(image["manifest"])
    assert puller.recorder.totals["to_peers"] == 0
    # The holder answered the puller's shoal from its own store: bytes local, and to peers.
    served = [p for p in holder.recorder.recent() if p.method == "GET"]
    assert {(p.source, p.asker) for p in served} == {("local", "peer")}
    assert holder.recorder.totals["to_peers"] == holder.recorder.totals["local"] > len(LAYER)
    minute = holder.recorder.by_minute()[-1]
    assert minute["local"] == minute["to_peers"] == holder.recorder.totals["local"]


async def test_a_redirected_blob_names_the_peer_and_the_size_it_was_sent_to_fetch(
    nodes: Nodes,
) -> None:
    holder, puller, image = await _holder_and_puller(nodes, redirect=True)
    async with aiohttp.ClientSession() as session:
        url = f"http://{puller.address}/v2/team/app/blobs/{image['ldig']}"
        async with session.get(url, params={"ns": NS}) as resp:  # follows the 307
            assert await resp.read() == LAYER
    [pull] = puller.recorder.recent()
    assert (pull.status, pull.source, pull.peer, pull.bytes) == (
        307, "peer", holder.address, len(LAYER),
    )  # fmt: skip
    assert puller.recorder.totals["peer"] == len(LAYER)
    [served] = [p for p in holder.recorder.recent() if p.method == "GET"]
    assert (served.source, served.asker, served.bytes) == ("local", "peer", len(LAYER))
    assert holder.recorder.totals["to_peers"] == len(LAYER)


class _Broken:
    """A blob whose body stops halfway."""

    size = len(LAYER)
    source = SourceKind.LOCAL

    def delivery(self) -> Delivery:
        return STREAMED

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        # Two pieces: the first is sent (a failure before any byte is an error answer).
        yield LAYER[: len(LAYER) // 4]
        yield LAYER[len(LAYER) // 4 : len(LAYER) // 2]
        raise ConnectionError("disk went away")


class _BrokenSource:
    name = SourceKind.LOCAL

    async def resolve(self, ref: object) -> None:
        return None

    async def find(self, ref: object, digest: Digest, kind: str) -> _Broken:
        return _Broken()


async def test_a_body_cut_off_midway_is_recorded_as_incomplete_and_not_counted() -> None:
    recorder = Recorder()
    server = TestServer(make_app(SourceChain([_BrokenSource()]), recorder=recorder))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = server.make_url(f"/v2/team/app/blobs/{Digest.of(LAYER)}")
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(url) as resp:
                    await resp.read()
    finally:
        await server.close()
    [pull] = recorder.recent()
    assert pull.status == 200 and not pull.complete
    assert recorder.totals["local"] == 0


async def test_misses_are_recorded_without_a_source() -> None:
    recorder = Recorder()
    server = TestServer(make_app(SourceChain([LocalSource(MemoryStore())]), recorder=recorder))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = server.make_url(f"/v2/team/app/blobs/{Digest.of(b'x')}")
            async with session.get(url, params={"ns": NS}) as resp:
                assert resp.status == 404
            async with session.get(server.make_url("/v2/")) as resp:  # not content: not recorded
                assert resp.status == 200
    finally:
        await server.close()
    [pull] = recorder.recent()
    assert (pull.status, pull.source, pull.bytes) == (404, "", 0)


def _pull(at: float, source: str, nbytes: int, asker: str = "containerd") -> Pull:
    return Pull(at, "GET", "blob", NS, "team/app", "sha256:" + "a" * 64, 200, nbytes, source,
                asker, 0.01)  # fmt: skip


def test_bytes_by_minute_cover_the_last_hour_and_forget_older_minutes() -> None:
    clock = Clock()
    recorder = Recorder(clock=clock)
    recorder.served(_pull(clock.now, "upstream", 100))
    clock.now += 60
    recorder.served(_pull(clock.now, "peer", 7))
    recorder.served(_pull(clock.now, "local", 5, asker="peer"))
    minutes = recorder.by_minute()
    assert len(minutes) == MINUTES
    assert [m["minute"] for m in minutes] == sorted(m["minute"] for m in minutes)
    assert minutes[-2]["upstream"] == 100
    assert (minutes[-1]["peer"], minutes[-1]["local"], minutes[-1]["to_peers"]) == (7, 5, 5)
    clock.now += 60 * MINUTES
    recorder.served(_pull(clock.now, "local", 1))
    assert sum(m["upstream"] + m["peer"] for m in recorder.by_minute()) == 0
    assert len(recorder._minutes) <= MINUTES
    assert recorder.totals["upstream"] == 100  # totals since start stay


def test_registry_labels_are_bounded() -> None:
    labels = RegistryLabels(limit=2)
    assert [labels(r) for r in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]


def _parts(recorder: Recorder, **overrides: object) -> NodeParts:
    values: dict = {
        "ready": lambda: True,
        "checks": lambda: {"containerd": True, "routing": True},
        "node_info": lambda: NodeInfo("12D3KooWtest", ("/ip4/10.0.0.1/tcp/30022",)),
        "members": lambda: [Peer("12D3KooWother", "10.0.0.2:30020")],
        "advertised": lambda: {"sha256:" + "b" * 64, f"{NS}/team/app:v1"},
        "listen": "10.0.0.1:30020",
        "metrics_listen": "10.0.0.1:30021",
        "containerd_version": lambda: "2.3.7",
        "namespace": "k8s.io",
        "recorder": recorder,
        "hostname": "node-1",
    }
    values.update(overrides)
    return NodeParts(**values)


async def test_status_json_and_page_show_the_same_facts() -> None:
    recorder = Recorder()
    recorder.served(replace(_pull(recorder.clock(), "peer", 4096), peer="10.0.0.2:30020"))
    recorder.refused("private", "a peer asked for a manifest")
    quarantined = [{"digest": "sha256:" + "c" * 64, "reason": "mismatch", "at": 1.0}]
    problems = LastProblem()
    problems.handle(_record("upstream unreachable"))
    app = web.Application()
    add_status_routes(app, _parts(recorder, quarantined=lambda: quarantined, problems=problems))
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.make_url("/status.json")) as resp:
                facts = await resp.json()
            async with session.get(server.make_url("/status")) as resp:
                assert resp.content_type == "text/html"
                page = await resp.text()
    finally:
        await server.close()
    assert facts["ready"] is True
    assert facts["node"]["peer_id"] == "12D3KooWtest"
    assert facts["node"]["containerd"] == "2.3.7"
    assert facts["peers"] == [{"id": "12D3KooWother", "address": "10.0.0.2:30020"}]
    assert facts["advertised"]["count"] == 2
    [pull] = facts["pulls"]
    assert (pull["source"], pull["peer"], pull["bytes"]) == ("peer", "10.0.0.2:30020", 4096)
    assert facts["served"]["peer"] == 4096
    assert facts["refusals"]["counts"] == {"private": 1}
    assert facts["quarantined"] == quarantined
    assert facts["last_problem"]["message"] == "upstream unreachable"
    assert len(facts["bytes_by_minute"]) == MINUTES
    json.dumps(facts)  # plain JSON all the way down
    assert 'id="readiness">ready<' in page
    assert 'data-source="peer"' in page and "10.0.0.2:30020" in page
    assert "4.0 KiB" in page
    assert "<svg" in page and "<rect" in page  # the hour's chart has a bar
    assert "c" * 64 in page and "upstream unreachable" in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://', "")


def test_page_escapes_what_clients_sent() -> None:
    recorder = Recorder()
    evil = Pull(recorder.clock(), "GET", "manifest", "<b>x</b>", "<script>alert(1)</script>",
                "v1", 404, 0, "", "containerd", 0.0)  # fmt: skip
    recorder.served(evil)
    page = render(status(_parts(recorder, ready=lambda: False)))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'id="readiness">not ready<' in page


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("shoal.x", logging.WARNING, __file__, 1, message, None, None)


async def test_timed_wrappers_observe_lookups_and_resolutions() -> None:
    net = MemoryNetwork()
    me, other = MemoryRouter(net, Peer("a", "a:1")), MemoryRouter(net, Peer("b", "b:1"))
    await other.advertise(["k"])

    def count(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = count("shoal_lookup_duration_seconds_count")
    assert [p.id async for p in TimedLookup(me).lookup("k")] == ["b"]
    assert count("shoal_lookup_duration_seconds_count") == before + 1

    class Tags:
        async def resolve(self, ref: object, sources: object) -> None:
            return None

    before = count("shoal_resolve_duration_seconds_count", result="unknown")
    assert await TimedTags(Tags()).resolve(make_reference(NS, "team/app", "v1"), []) is None
    assert count("shoal_resolve_duration_seconds_count", result="unknown") == before + 1


class _DeadAtOnce(_Broken):
    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        raise ConnectionError("its peer went away")
        yield b""


class _DeadSource(_BrokenSource):
    async def find(self, ref: object, digest: Digest, kind: str) -> _Broken:
        return _DeadAtOnce()


async def test_a_source_that_fails_before_its_first_byte_is_a_miss_not_a_broken_200() -> None:
    """containerd fails a pull attempt on a body that breaks off, but tries its next host on
    an error answer: nothing is answered until the first bytes are there."""
    server = TestServer(make_app(SourceChain([_DeadSource()])))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = server.make_url(f"/v2/team/app/blobs/{Digest.of(LAYER)}")
            async with session.get(url) as resp:
                assert resp.status == 404
                assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    finally:
        await server.close()
