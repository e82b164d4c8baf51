"""A designated fetcher that answered "not there" has asked upstream for the cluster: its miss
is final here (a hung upstream costs its deadline once, not twice); only one that gave no answer
at all makes this node fetch for itself."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.fetch.designate import Designation, designated
from shoal.fetch.sharing import SharedFetches
from shoal.fetch.spool import Spool
from shoal.oci.digest import Digest
from shoal.oci.names import make_reference
from shoal.routing import Peer
from shoal.sources.peers import PeerSource, PeerUnreachable
from shoal.sources.upstream import UpstreamFetcher
from tests.fakes.images import NS
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.fakes.signing import signer

REF = make_reference(NS, "team/app", "v1")
DIGEST = Digest.of(b"a blob nobody has")


@pytest.fixture
async def answering() -> AsyncIterator[str]:
    """A peer's shoal that answers every request 404."""

    async def miss(_: web.Request) -> web.Response:
        return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", miss)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"127.0.0.1:{server.port}"
    await server.close()


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_fetch_at_tells_a_miss_from_no_answer(answering: str) -> None:
    peers = PeerSource(MemoryRouter(MemoryNetwork(), Peer("me", "127.0.0.1:1")), signer=signer())
    try:
        assert await peers.fetch_at(Peer("p", answering), REF, DIGEST, "blob") is None
        with pytest.raises(PeerUnreachable):
            await peers.fetch_at(Peer("p", _closed_port()), REF, DIGEST, "blob")
    finally:
        await peers.close()


class Upstream:
    def __init__(self) -> None:
        self.asked = 0

    def endpoint(self, registry: str | None) -> object:
        return object()

    async def resolve(self, ref: object) -> None:
        return None

    async def manifest(self, ref: object, digest: object) -> None:
        return None

    async def find(self, ref: object, digest: object, kind: str) -> None:
        self.asked += 1
        return None


@pytest.mark.parametrize("reachable", [True, False])
async def test_only_an_unreachable_designated_fetcher_makes_this_node_ask(
    tmp_path: Path, answering: str, reachable: bool
) -> None:
    me = Peer("me", "127.0.0.1:1")
    other = Peer("other", answering if reachable else _closed_port())
    net = MemoryNetwork()
    router = MemoryRouter(net, me)
    await router.start()
    await MemoryRouter(net, other).start()
    # A digest the other node is designated to fetch.
    digest = next(
        d
        for d in (Digest.of(bytes([i])) for i in range(100))
        if designated(d, [me, other]) == other
    )
    spool = Spool(tmp_path / "spool", 1 << 30)
    upstream, peers = Upstream(), PeerSource(router, signer=signer())
    fetcher = UpstreamFetcher(
        upstream, SharedFetches(spool, router), Designation(router, lambda: me, None), peers,
        delegate=True,
    )  # fmt: skip
    try:
        assert await fetcher.find(REF, digest, "blob") is None
    finally:
        await peers.close()
        await spool.close()
    assert upstream.asked == (0 if reachable else 1)
