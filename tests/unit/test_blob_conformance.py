"""One contract for every Blob and every Source that yields them, as containerd's content
testsuite is for its stores: sizes, whole reads, ranges (first byte, last byte, empty), the
end of a read, and that a byte changed at the origin never yields a completed verified read or
response. Responses are taken through the registry app, where shoal verifies.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.containerd.client import ContainerdClient
from shoal.content.memory import MemoryBlob
from shoal.content.model import Blob, ContentKind, Delivery, Descriptor, SourceKind
from shoal.fetch.designate import Designation
from shoal.fetch.imageorder import GatedBlob
from shoal.fetch.sharing import SharedFetches
from shoal.fetch.spool import Spool
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.registry.app import make_app
from shoal.registry.transfer import PeerTransfer
from shoal.routing import Peer
from shoal.sources.chain import SourceChain
from shoal.sources.inflight import InFlightSource
from shoal.sources.local import LocalSource
from shoal.sources.nodestore import ContainerdStore
from shoal.sources.peers import PeerSettings, PeerSource
from shoal.sources.upstream import UpstreamFetcher
from shoal.tenancy.keys import ClusterKey
from shoal.tenancy.signer import PeerSigner
from shoal.upstream import UpstreamSource
from tests.fakes.registries import Servers, serve_bytes
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.fakes.store import FileStore, MemoryStore
from tests.fakes.upstream import ref, source

DATA = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, past sendfile's hold-back, unaligned
DIGEST = Digest.of(DATA)
SIZE = len(DATA)
RANGES = [(0, 1), (SIZE - 1, SIZE), (0, 0), (SIZE, SIZE), (1000, 5000), (70_000, SIZE)]
# Blobs whose own reads hold back the end until the digest matched (the registry then sends them
# as they come); every other one is hashed by the registry per response.
SELF_VERIFYING = ("spool", "in flight", "upstream", "upstream, through the fetcher and the spool")


@dataclass
class Env:
    tmp: Path
    servers: Servers
    stack: AsyncExitStack
    made: int = 0

    def dir(self, name: str) -> Path:
        self.made += 1
        path = self.tmp / f"{name}-{self.made}"
        path.mkdir(parents=True)
        return path


Maker = Callable[[bytes, Env], AbstractAsyncContextManager[Blob]]
CASES: dict[str, Maker] = {}


def case(name: str) -> Callable[[Callable[[bytes, Env], AsyncIterator[Blob]]], None]:
    """Registers a maker: given the origin's bytes (maybe wrong for DIGEST), it yields the Blob
    under test, found the way the product finds it."""

    def register(fn: Callable[[bytes, Env], AsyncIterator[Blob]]) -> None:
        CASES[name] = asynccontextmanager(fn)

    return register


def found(blob: Blob | None) -> Blob:
    assert blob is not None, "the source under test found nothing"
    return blob


REF = Reference(registry=None, repository="team/app")


@case("local, memory store")
async def _local_memory(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    store = MemoryStore()
    store.add(origin, DIGEST)
    yield found(await LocalSource(store).find(REF, DIGEST, "blob"))


@case("local, files (sendfile)")
async def _local_files(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    store = FileStore(env.dir("files"))
    store.add(origin, DIGEST)
    yield found(await LocalSource(store).find(REF, DIGEST, "blob"))


@case("local, containerd content directory")
async def _local_containerd(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    root = env.dir("content")
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / DIGEST.hex).write_bytes(origin)
    # Never connected: read from disk only, as when containerd's directory is mounted.
    client = ContainerdClient(str(env.tmp / "no.sock"), content_root=str(root))
    await client.content_root()
    yield found(await LocalSource(ContainerdStore(client)).find(REF, DIGEST, "blob"))


@case("memory")
async def _memory(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    yield MemoryBlob(origin)


async def _spool(env: Env) -> Spool:
    spool = Spool(env.dir("spool"), 1 << 30)
    env.stack.push_async_callback(spool.close)
    return spool


@case("spool")
async def _spooled(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    net = MemoryNetwork()
    sharing = SharedFetches(await _spool(env), MemoryRouter(net, Peer("me", "127.0.0.1:1")))
    yield await sharing.copy(DIGEST, MemoryBlob(origin))


@case("in flight")
async def _in_flight(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    net = MemoryNetwork()
    sharing = SharedFetches(await _spool(env), MemoryRouter(net, Peer("me", "127.0.0.1:1")))
    assert sharing.start(DIGEST, MemoryBlob(origin)) is not None
    yield found(await InFlightSource(sharing).find(REF, DIGEST, "blob"))


@case("gated")
async def _gated(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    spool = await _spool(env)
    before = spool.start(Digest.of(b"before"), MemoryBlob(b"before"))
    assert before is not None
    yield GatedBlob(MemoryBlob(origin), before)


async def _raw_peer(origin: bytes, env: Env) -> str:
    """A peer that serves `origin` under any path, with Range, and never verifies it."""

    async def answer(request: web.Request) -> web.StreamResponse:
        return await serve_bytes(request, origin)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    env.stack.push_async_callback(server.close)
    return f"127.0.0.1:{server.port}"


@case("peer")
async def _peer(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    net = MemoryNetwork()
    holder = MemoryRouter(net, Peer("holder", await _raw_peer(origin, env)))
    me = MemoryRouter(net, Peer("me", "127.0.0.1:1"))
    await holder.advertise([str(DIGEST)])
    signer = PeerSigner(ClusterKey(b"a key of the blob conformance tests"), lambda: "me")
    peers = PeerSource(me, PeerSettings(), signer=signer)
    env.stack.push_async_callback(peers.close)
    yield found(await peers.find(REF, DIGEST, "blob"))


async def _upstream_ref(
    origin: bytes, env: Env, **kwargs: object
) -> tuple[Reference, UpstreamSource]:
    reg = await env.servers.registry()
    reg.blobs[str(DIGEST)] = origin  # served as it is, under DIGEST
    up = source(reg, **kwargs)
    env.stack.push_async_callback(up.close)
    return ref(reg, str(DIGEST)), up


@case("upstream")
async def _upstream(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    r, up = await _upstream_ref(origin, env)
    yield found(await up.find(r, DIGEST, "blob"))


@case("upstream, unhashed (as the daemon reads it)")
async def _upstream_unhashed(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    r, up = await _upstream_ref(origin, env, verify_blobs=False)
    yield found(await up.find(r, DIGEST, "blob"))


class _Nobody:
    async def fetch_at(self, *args: object) -> None:
        raise AssertionError("a node fetching for itself asks no peer")


@case("upstream, through the fetcher and the spool")
async def _upstream_fetched(origin: bytes, env: Env) -> AsyncIterator[Blob]:
    r, up = await _upstream_ref(origin, env, verify_blobs=False)
    router = MemoryRouter(MemoryNetwork(), Peer("me", "127.0.0.1:1"))
    sharing = SharedFetches(await _spool(env), router)
    fetcher = UpstreamFetcher(
        up, sharing, Designation(router, lambda: None, None), _Nobody(), delegate=True
    )
    yield found(await fetcher.find(r, DIGEST, "blob"))


@pytest.fixture
async def env(tmp_path: Path, servers: Servers) -> AsyncIterator[Env]:
    async with AsyncExitStack() as stack:
        yield Env(tmp_path, servers, stack)


async def read(blob: Blob, start: int, end: int) -> bytes:
    return b"".join([c async for c in blob.open(start, end)])


def corrupt(at: int) -> bytes:
    bad = bytearray(DATA)
    bad[at] ^= 0x01
    return bytes(bad)


class OneBlob:
    """A Source with exactly the blob under test, so the registry serves it."""

    def __init__(self, blob: Blob) -> None:
        self.blob = blob
        self.name: SourceKind = blob.source

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return None

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        return self.blob if digest == DIGEST and kind == "blob" else None


@asynccontextmanager
async def served(blob: Blob) -> AsyncIterator[str]:
    """The blob's URL at shoal's registry app; peers' bodies are relayed (verified here)."""
    app = make_app(SourceChain([OneBlob(blob)]), transfer=PeerTransfer(redirect=False))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url(f"/v2/team/app/blobs/{DIGEST}"))
    finally:
        await server.close()


async def get(url: str, range_: str | None) -> tuple[int, bytes | None]:
    """Status and body; None for a body that did not complete (cut, or shorter than said)."""
    headers = {"Range": range_} if range_ else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        try:
            body = await resp.read()
        except aiohttp.ClientPayloadError:
            return resp.status, None
        if resp.content_length is not None and len(body) != resp.content_length:
            return resp.status, None
        return resp.status, body


# --- the contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
async def test_reads_give_exactly_the_bytes_asked_for(name: str, env: Env) -> None:
    async with CASES[name](DATA, env) as blob:
        assert blob.size == SIZE
        assert isinstance(blob.source, SourceKind)
        assert hashlib.sha256(await read(blob, 0, SIZE)).digest() == hashlib.sha256(DATA).digest()
        for start, end in RANGES:
            assert await read(blob, start, end) == DATA[start:end], (start, end)
        assert await read(blob, 0, SIZE) == DATA  # a blob can be read again
        delivery = blob.delivery()
        assert isinstance(delivery, Delivery)
        assert delivery.verified == (name in SELF_VERIFYING and name != "upstream")
        if delivery.local_file is not None:
            assert await asyncio.to_thread(Path(delivery.local_file.path).read_bytes) == DATA


@pytest.mark.parametrize("name", CASES)
async def test_the_registry_serves_it_whole_and_by_range(name: str, env: Env) -> None:
    async with CASES[name](DATA, env) as blob, served(blob) as url:
        assert await get(url, None) == (200, DATA)
        assert await get(url, "bytes=0-0") == (206, DATA[:1])
        assert await get(url, f"bytes={SIZE - 1}-") == (206, DATA[-1:])
        assert await get(url, "bytes=100-2000000") == (206, DATA[100:2000001])
        assert (await get(url, f"bytes={SIZE}-"))[0] == 416


@pytest.mark.parametrize("at", [0, SIZE // 2, SIZE - 1])
@pytest.mark.parametrize("name", CASES)
async def test_a_wrong_byte_never_completes_a_response(name: str, at: int, env: Env) -> None:
    """Whatever part is asked for, also one that leaves the wrong byte out, no response with
    wrong content completes: containerd would commit it."""
    for range_ in (None, "bytes=0-999", "bytes=1000-2000000", f"bytes={SIZE - 1000}-"):
        async with CASES[name](corrupt(at), env) as blob, served(blob) as url:
            status, body = await get(url, range_)
            assert body is None or status not in (200, 206), (range_, status)


@pytest.mark.parametrize("name", SELF_VERIFYING)
async def test_a_blob_that_verifies_itself_never_completes_a_bad_read(name: str, env: Env) -> None:
    """The spool's blobs, and upstream's whole reads, hold back the end of a read of wrong
    bytes: it raises instead of completing."""
    async with CASES[name](corrupt(SIZE - 1), env) as blob:
        got = bytearray()
        with pytest.raises((OSError, ConnectionError)):
            async for chunk in blob.open(0, SIZE):
                got += chunk
        assert len(got) < SIZE
