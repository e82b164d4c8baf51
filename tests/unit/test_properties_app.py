"""Property-based requests against the running registry (shoal's HTTP server, a node store on
disk, peers that have nothing, an upstream that refuses connections): whatever the method,
path, query and headers, the answer is never 5xx, never missing, and every error is an OCI
error JSON body (HEAD: none, but its length); nothing is logged as an error."""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.parse
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.registry.app import make_app
from shoal.registry.httpserver import ServerLimits
from shoal.registry.protocol import PEER_HEADER
from shoal.routing import Peer
from shoal.sources.chain import SourceChain
from shoal.sources.local import LocalSource
from shoal.sources.peers import PeerSource
from shoal.sources.tags import TagPolicy
from shoal.upstream import UpstreamSource
from tests.fakes.images import NS, build_image
from tests.fakes.rawhttp import Answer, read_response, serve
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.fakes.signing import signer
from tests.fakes.store import FileStore
from tests.fakes.upstream import FAST_RETRY

REFUSED = "127.0.0.1:9"  # an allowed upstream nobody listens on


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict, Errors]]:
    """The app served from a thread of its own, so hypothesis' examples can stay synchronous."""
    ready: dict = {}
    started = threading.Event()
    errors = Errors()
    logging.getLogger().addHandler(errors)

    async def main() -> None:
        store = FileStore(tmp_path_factory.mktemp("store"))
        ready["image"] = build_image(store)
        router = MemoryRouter(MemoryNetwork(), Peer("me", "127.0.0.1:1"))
        await router.start()
        peers = PeerSource(router, signer=signer())
        upstream = UpstreamSource([REFUSED], insecure=[REFUSED], retry=FAST_RETRY)
        chain = SourceChain([LocalSource(store), peers], tags=TagPolicy("upstream-first", upstream))
        limits = ServerLimits(header_timeout=5, idle_timeout=5)
        async with serve(make_app(chain), limits) as (port, _):
            stop = asyncio.Event()
            ready["port"], ready["stop"] = port, (asyncio.get_running_loop(), stop)
            started.set()
            await stop.wait()
        await peers.close()
        await upstream.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30)
    yield ready["port"], ready["image"], errors
    loop, stop = ready["stop"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    logging.getLogger().removeHandler(errors)


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="/:@")


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # no lone surrogates
COMPONENT = st.from_regex(r"\A[a-z0-9]+(?:[._-][a-z0-9]+)?\Z", fullmatch=True) | TEXT.map(_quote)
NAMES = st.lists(COMPONENT, min_size=0, max_size=3).map("/".join) | st.just("team/app")
DIGEST = st.sampled_from(["sha256:", "sha512:", "md5:", ""]).flatmap(
    lambda a: st.text("0123456789abcdef", min_size=0, max_size=130).map(lambda h: a + h)
)


@st.composite
def references(draw: st.DrawFn, image: dict) -> str:
    known = [str(image[k]) for k in ("mdig", "cdig", "ldig")]
    return draw(st.sampled_from([*known, "v1", "latest"]) | DIGEST | TEXT.map(_quote))


@st.composite
def targets(draw: st.DrawFn, image: dict) -> str:
    kind = draw(st.sampled_from(["manifests", "blobs", "tags", "", "manifests/x"]))
    path = f"/v2/{draw(NAMES)}/{kind}/{draw(references(image))}"
    path = draw(
        st.just(path)
        | st.sampled_from(["/v2/", "/v2", "/", "*", "//v2//", "/_shoal/p2p", "/v2/../etc"])
        | TEXT.map(lambda t: "/" + _quote(t))
    )
    query = {}
    ns = draw(st.none() | st.sampled_from([NS, REFUSED, "docker.io", "a%01b"]) | TEXT)
    if ns is not None:
        query["ns"] = ns
    for key in draw(
        st.lists(st.sampled_from(["shoal-peer", "shoal-fetch", "x", "ns"]), max_size=2)
    ):
        query[key] = draw(TEXT)
    if query:
        path += "?" + urllib.parse.urlencode(query)
    if draw(st.booleans()):
        path = "http://shoal.example" + path  # absolute form
    return path


HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
RANGES = st.sampled_from(["bytes=0-", "bytes=5-9", "bytes=-100", "bytes=9-5", "bytes=0-0,5-"]) | (
    st.tuples(st.integers(0, 4 * 2**20), st.integers(0, 4 * 2**20)).map(
        lambda p: f"bytes={p[0]}-{p[1]}"
    )
)


@st.composite
def requests(draw: st.DrawFn, image: dict) -> tuple[str, bytes]:
    method = draw(
        st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
    )
    headers = {"Host": "shoal"}
    if draw(st.booleans()):
        headers["Range"] = draw(RANGES | HEADER_VALUE)
    if draw(st.booleans()):
        headers["Accept"] = draw(HEADER_VALUE)
    if draw(st.booleans()):
        headers[PEER_HEADER] = "1"
    for _ in range(draw(st.integers(0, 2))):
        headers[draw(st.from_regex(r"\AX-[A-Za-z0-9-]{1,20}\Z", fullmatch=True))] = draw(
            HEADER_VALUE
        )
    head = f"{method} {draw(targets(image))} HTTP/1.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return method, head.encode("latin-1", "replace")


def _ask(port: int, data: bytes, head: bool) -> Answer | None:
    async def go() -> Answer | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            return await read_response(reader, head=head, timeout=30)
        finally:
            writer.close()

    return asyncio.run(go())


def test_any_request_gets_an_answer_and_errors_are_oci(running) -> None:
    port, image, errors = running

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(requests(image))
    def check(request: tuple[str, bytes]) -> None:
        method, data = request
        answer = _ask(port, data, head=method == "HEAD")
        assert answer is not None, "no answer at all"
        assert answer.status < 500, answer
        if answer.status >= 400:
            if method == "HEAD":
                assert answer.body == b"" and "content-length" in answer.headers
            else:
                assert answer.oci_error() is not None, answer
        assert not errors.records, errors.records[0].getMessage()

    check()


def test_the_fixture_serves(running) -> None:
    port, _, _ = running
    request = f"HEAD /v2/team/app/manifests/v1?ns={NS} HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = _ask(port, request.encode(), True)
    assert answer is not None and answer.status == 200
