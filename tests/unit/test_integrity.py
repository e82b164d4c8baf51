"""The node's own files: verified once then sent unhashed, quarantined when they do not match
(withdrawn, 404, counted and logged once), kept across restarts, lifted by a new good copy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal import metrics
from shoal.catalog import Catalog
from shoal.integrity.guard import Integrity
from shoal.integrity.identity import FileIdentity, identity_of
from shoal.integrity.ledger import Ledger, keep_saved
from shoal.integrity.scrub import Scrub, ScrubSettings
from shoal.oci.digest import Digest
from shoal.registry.app import make_app
from shoal.routing import Peer
from shoal.sources.chain import SourceChain
from shoal.sources.local import LocalSource
from tests.fakes.images import LAYER
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.fakes.store import FileStore

DIGEST = Digest.of(LAYER)


class Holdings:
    def __init__(self, *keys: str) -> None:
        self.keys = set(keys)

    async def __call__(self, client: object) -> set[str]:
        return set(self.keys)


@dataclass
class Node:
    """One node's store, ledger, catalog and registry app; `observer` is another node."""

    tmp: Path
    store: FileStore
    ledger_path: Path
    integrity: Integrity
    catalog: Catalog
    observer: MemoryRouter
    server: TestServer
    session: aiohttp.ClientSession

    @property
    def path(self) -> Path:
        return self.tmp / "store" / DIGEST.hex

    async def get(self, method: str = "GET") -> tuple[int, bytes | None]:
        """Status and body; None when the body did not complete."""
        url = self.server.make_url(f"/v2/team/app/blobs/{DIGEST}")
        async with self.session.request(method, url) as resp:
            try:
                return resp.status, await resp.read()
            except aiohttp.ClientPayloadError:
                return resp.status, None

    async def advertised(self) -> bool:
        return [p.id async for p in self.observer.lookup(str(DIGEST))] == ["me"]

    def flip(self, at: int = len(LAYER) // 2) -> None:
        """One byte changed in place, through the filesystem (mtime and ctime move)."""
        with open(self.path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 1]))

    def quarantines(self, found_by: str) -> float:
        return metrics.QUARANTINED.labels(found_by)._value.get()


async def start_node(tmp: Path, net: MemoryNetwork | None = None) -> Node:
    """Started twice on one `tmp`, the second node finds the first one's store and ledger."""
    net = net or MemoryNetwork()
    (tmp / "store").mkdir(exist_ok=True)
    store = FileStore(tmp / "store")
    if not (tmp / "store" / DIGEST.hex).exists():
        store.add(LAYER)
    else:
        store.blobs[DIGEST] = LAYER
    observer = MemoryRouter(net, Peer("other", "10.0.0.2:1"))
    router = MemoryRouter(net, Peer("me", "10.0.0.1:1"))
    await observer.start()
    await router.start()
    ledger = Ledger(tmp / "verified.json")
    catalog = Catalog(None, router, 60, read_keys=Holdings(str(DIGEST)))  # type: ignore[arg-type]
    catalog.excluded.update(ledger.quarantined())
    await catalog.sync()
    integrity = Integrity(ledger, catalog)
    app = make_app(SourceChain([LocalSource(store, integrity)]))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    return Node(tmp, store, tmp / "verified.json", integrity, catalog, observer, server, session)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = await start_node(tmp_path)
    yield n
    await stop(n)


async def stop(n: Node) -> None:
    await n.session.close()
    await n.server.close()
    await n.integrity.close()
    n.integrity.ledger.save()


async def settled(n: Node) -> None:
    """Lets background withdrawals and rechecks finish."""
    for _ in range(100):
        pending = [*n.integrity._background, *n.integrity._rechecks.values()]
        if not pending:
            return
        await asyncio.gather(*pending, return_exceptions=True)


async def test_a_verified_file_is_sent_unhashed_until_the_scrub_finds_it_rotted(node: Node) -> None:
    """Disk rot leaves a file's identity as it was: the record is trusted (the point of it:
    sendfile alone), so only the scrub can find it. Faked here by recording the rotted file's
    identity, as ext4 cannot rot a byte without moving ctime."""
    assert await node.get() == (200, LAYER)  # hashed while sent, then on record
    node.flip()
    node.integrity.ledger.record(FileIdentity.of(os.stat(node.path)), str(DIGEST))
    status, body = await node.get()
    assert status == 200 and body is not None and body != LAYER  # sent as recorded: unhashed
    before = node.quarantines("scrub")
    scrub = Scrub(node.integrity, lambda d: str(node.store.root / d.hex), ScrubSettings())
    entry = node.integrity.ledger.verified_entry(str(DIGEST))
    assert entry is not None
    await scrub.scrub(entry)
    await settled(node)
    assert node.quarantines("scrub") == before + 1
    status, body = await node.get()
    assert status == 404 and body is not None and b"BLOB_UNKNOWN" in body
    assert (await node.get("HEAD"))[0] == 404
    assert not await node.advertised()


async def test_a_file_changed_since_it_was_verified_is_hashed_and_quarantined(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    assert await node.get() == (200, LAYER)
    assert await node.advertised()
    node.flip()  # identity moved: hashed again while sent, the end held back
    before = node.quarantines("serving")
    with caplog.at_level(logging.WARNING, logger="shoal.integrity"):
        # Cut, both (they share one hashing pass): containerd never commits it.
        assert await asyncio.gather(node.get(), node.get()) == [(200, None), (200, None)]
        await settled(node)
        for _ in range(3):  # from now on a miss: containerd and peers go elsewhere
            status, body = await node.get()
            assert status == 404 and body is not None and b"BLOB_UNKNOWN" in body
    assert node.quarantines("serving") == before + 1
    lines = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert not await node.advertised()
    await node.catalog.sync()  # a resync must not advertise it again
    assert not await node.advertised()


async def test_a_quarantine_survives_a_restart_and_only_a_new_good_copy_lifts_it(
    tmp_path: Path,
) -> None:
    net = MemoryNetwork()
    first = await start_node(tmp_path, net)
    assert await first.get() == (200, LAYER)
    first.flip()
    assert (await first.get())[1] is None
    await settled(first)
    await stop(first)

    again = await start_node(tmp_path, net)
    try:
        assert (await again.get())[0] == 404
        await settled(again)  # the bad file itself was looked at: still quarantined
        assert (await again.get())[0] == 404
        assert not await again.advertised()
        await settled(again)
        # containerd pulls it again: a new file (new inode) with the right bytes.
        tmp = again.path.with_suffix(".new")
        tmp.write_bytes(LAYER)
        os.replace(tmp, again.path)
        assert (await again.get())[0] == 404  # not served before it was hashed
        await settled(again)
        assert await again.get() == (200, LAYER)
        await again.catalog.sync()
        assert await again.advertised()
    finally:
        await stop(again)


async def test_another_size_for_a_recorded_digest_is_quarantined_without_hashing(
    node: Node,
) -> None:
    assert await node.get() == (200, LAYER)
    before = node.quarantines("size")
    os.truncate(node.path, len(LAYER) - 1)
    assert (await node.get())[0] == 404
    assert node.quarantines("size") == before + 1


def test_the_ledger_round_trips_and_an_unreadable_one_trusts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "verified.json"
    (tmp_path / "f").write_bytes(b"x")
    ident = identity_of(str(tmp_path / "f"))
    assert ident is not None
    ledger = Ledger(path)
    ledger.record(ident, "sha256:" + "a" * 64)
    ledger.quarantine("sha256:" + "b" * 64, ident)
    ledger.quarantine("sha256:" + "c" * 64, None)
    ledger.save()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    loaded = Ledger(path)
    assert loaded.is_verified(ident, "sha256:" + "a" * 64)
    assert loaded.quarantined_identity("sha256:" + "b" * 64) == ident
    assert loaded.is_quarantined("sha256:" + "c" * 64)
    other_version = path.read_bytes().replace(b'"version":1', b'"version":99')
    broken_states = (b"{", b'{"version": 1}', b'{"version": 1, "verified": [["x"]]}', b"\xff")
    for garbage in (*broken_states, other_version):
        path.write_bytes(garbage)
        broken = Ledger(path)
        assert broken.verified() == [] and broken.quarantined() == []


def test_the_ledger_is_bounded(tmp_path: Path) -> None:
    ledger = Ledger(None, max_verified=3, max_quarantined=2)
    for i in range(5):
        ledger.record(FileIdentity(1, i, 10, i, i), f"sha256:{i:064x}", at=float(i))
        ledger.quarantine(f"sha256:{i + 10:064x}", None)
    assert sorted(e.identity.ino for e in ledger.verified()) == [2, 3, 4]  # the oldest left
    assert len(ledger.quarantined()) == 2


def test_the_scrub_reads_at_a_bounded_rate(node: Node) -> None:
    mib = 1024 * 1024
    ledger = Ledger(None)
    scrub = Scrub(Integrity(ledger), lambda d: None, ScrubSettings(100.0, mib, 8 * mib))
    assert scrub.rate() == mib  # nothing recorded: the floor
    ledger.record(FileIdentity(1, 1, 400 * mib, 0, 0), "sha256:" + "a" * 64)
    assert scrub.rate() == 4 * mib  # 400 MiB within 100 s
    ledger.record(FileIdentity(1, 2, 4000 * mib, 0, 0), "sha256:" + "b" * 64)
    assert scrub.rate() == 8 * mib  # the ceiling
    scrub.integrity.active = 1
    assert scrub.rate() == mib  # serving is busy: the floor


async def test_the_scrub_forgets_vanished_files_and_keeps_good_ones(node: Node) -> None:
    assert await node.get() == (200, LAYER)
    ledger = node.integrity.ledger
    entry = ledger.verified_entry(str(DIGEST))
    assert entry is not None
    scrub = Scrub(node.integrity, lambda d: str(node.store.root / d.hex), ScrubSettings())
    await scrub.scrub(entry)
    again = ledger.verified_entry(str(DIGEST))
    assert again is not None and again.at >= entry.at and not ledger.is_quarantined(str(DIGEST))
    node.path.unlink()
    await scrub.scrub(again)
    assert ledger.verified_entry(str(DIGEST)) is None and not ledger.is_quarantined(str(DIGEST))


async def test_a_quarantined_file_that_vanished_is_forgotten_and_its_next_copy_advertised(
    node: Node,
) -> None:
    assert await node.get() == (200, LAYER)
    node.flip()
    assert (await node.get())[1] is None
    await settled(node)
    node.path.unlink()  # the image was removed: containerd's GC took the bad file
    scrub = Scrub(node.integrity, lambda d: str(node.store.root / d.hex), ScrubSettings())
    await scrub.look_at_quarantined()
    node.path.write_bytes(LAYER)  # and pulled again
    await node.catalog.sync()
    assert await node.advertised()
    assert await node.get() == (200, LAYER)


async def test_the_ledger_is_written_out_while_it_changes_and_once_more_at_shutdown(
    tmp_path: Path,
) -> None:
    path = tmp_path / "verified.json"
    ledger = Ledger(path)
    saver = asyncio.ensure_future(keep_saved(ledger, every=0.01))
    ledger.record(FileIdentity(1, 1, 1, 1, 1), "sha256:" + "a" * 64)
    async with asyncio.timeout(30):
        while not Ledger(path).verified():  # noqa: ASYNC110 - polling the file on disk
            await asyncio.sleep(0.01)
    ledger.quarantine("sha256:" + "b" * 64, None)
    saver.cancel()  # before its next turn: the shutdown write keeps it
    with contextlib.suppress(asyncio.CancelledError):
        await saver
    assert Ledger(path).is_quarantined("sha256:" + "b" * 64)
