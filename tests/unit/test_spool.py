"""The upstream spool: single flight, readers following a growing file, verification, bounds."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal.content.model import STREAMED, Delivery, SourceKind
from shoal.fetch.designate import designated
from shoal.fetch.spool import FetchFailed, Spool
from shoal.oci.digest import Digest
from shoal.routing import Peer

DATA = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = Digest.of(DATA)


class Trickle:
    """A source Blob that hands out its bytes only when the test says so."""

    source = SourceKind.UPSTREAM

    def delivery(self) -> Delivery:
        return STREAMED

    def __init__(self, data: bytes, chunk: int = 1024 * 1024) -> None:
        self.data, self.size, self.chunk = data, len(data), chunk
        self.opens = 0
        self.gate = asyncio.Semaphore(0)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        self.opens += 1
        for pos in range(start, end, self.chunk):
            await self.gate.acquire()
            yield self.data[pos : min(end, pos + self.chunk)]


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in it])


async def test_readers_follow_the_growing_file_and_share_one_fetch(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 30, keep_for=0.1)
    source = Trickle(DATA)
    fetch = spool.start(DIGEST, source)
    assert fetch is not None
    assert spool.start(DIGEST, Trickle(DATA)) is fetch  # joined, not started again
    readers = [asyncio.create_task(collect(fetch.read(0, len(DATA)))) for _ in range(3)]
    tail = asyncio.create_task(collect(fetch.read(1_000_000, 2_000_000)))
    source.release(1)
    await asyncio.sleep(0.05)
    assert fetch.written == 1024 * 1024  # readers got going before the fetch finished
    assert not any(r.done() for r in readers)
    source.release(10)
    assert await asyncio.gather(*readers) == [DATA] * 3
    assert await tail == DATA[1_000_000:2_000_000]
    assert source.opens == 1
    await spool.close()


async def test_bytes_that_arrived_reach_readers_while_the_source_stalls(tmp_path: Path) -> None:
    """Small pieces are written in batches; a stall must not keep the ones that came back."""
    spool = Spool(tmp_path / "spool", 1 << 30, keep_for=0.1)
    source = Trickle(DATA, chunk=4096)
    fetch = spool.start(DIGEST, source)
    assert fetch is not None
    reader = asyncio.create_task(collect(fetch.read(0, len(DATA))))
    source.release(3)  # then the source stalls
    for _ in range(100):
        if fetch.written == 3 * 4096:
            break
        await asyncio.sleep(0.02)
    assert fetch.written == 3 * 4096
    source.release(len(DATA) // 4096 + 1)
    assert await reader == DATA
    await spool.close()


async def test_bad_bytes_never_complete_a_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 30)
    bad = bytearray(DATA)
    bad[-1] ^= 1
    source = Trickle(bytes(bad))
    fetch = spool.start(DIGEST, source)
    assert fetch is not None
    # Even a range that ends long before the bad byte waits for the digest to match.
    head = asyncio.create_task(collect(fetch.read(0, 1000)))
    source.release(10)
    with pytest.raises(FetchFailed):
        await head
    with pytest.raises(FetchFailed):
        await collect(fetch.read(0, len(DATA)))
    await asyncio.sleep(0)
    assert spool.get(DIGEST) is None  # a failed fetch is forgotten
    assert not fetch.path.exists()
    await spool.close()


async def test_spool_is_bounded_and_emptied_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "sha256-leftover").write_bytes(b"partial from a crash")
    spool = Spool(directory, max_bytes=len(DATA) + 10)
    assert list(directory.iterdir()) == []
    assert spool.start(DIGEST, Trickle(DATA)) is not None
    other = b"x" * 100
    assert spool.start(Digest.of(other), Trickle(other)) is None  # would not fit
    await spool.close()


async def test_finished_file_is_kept_until_containerd_has_it(tmp_path: Path) -> None:
    held = asyncio.Event()

    async def held_locally(digest: Digest) -> bool:
        return held.is_set()

    spool = Spool(tmp_path / "spool", 1 << 30, keep_for=30, held_locally=held_locally)
    source = Trickle(DATA)
    fetch = spool.start(DIGEST, source)
    assert fetch is not None
    source.release(10)
    assert await collect(fetch.read(0, len(DATA))) == DATA
    await asyncio.sleep(0.1)
    assert spool.get(DIGEST) is fetch and fetch.path.exists()  # peers can still read it
    held.set()
    for _ in range(40):
        if spool.get(DIGEST) is None:
            break
        await asyncio.sleep(0.1)
    assert spool.get(DIGEST) is None and not fetch.path.exists()
    await spool.close()


def test_designated_fetcher_is_the_same_for_every_view_order() -> None:
    peers = [Peer(f"12D3KooW{i}", f"10.0.0.{i}:30020") for i in range(8)]
    digests = [Digest.of(bytes([i])) for i in range(200)]
    for digest in digests:
        assert designated(digest, peers) == designated(digest, list(reversed(peers)))
    # Spread: no node is designated for everything.
    chosen = {designated(d, peers).id for d in digests}
    assert len(chosen) == 8
    # A node leaving moves only its own digests.
    without = [p for p in peers if p.id != "12D3KooW3"]
    for digest in digests:
        before = designated(digest, peers)
        if before.id != "12D3KooW3":
            assert designated(digest, without) == before


async def test_sendfile_regions_cover_the_range_and_hold_back_a_bad_end(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 30)
    source = Trickle(DATA)
    fetch = spool.start(DIGEST, source)
    assert fetch is not None
    regions = asyncio.create_task(collect_regions(fetch.regions(100, len(DATA))))
    source.release(10)
    pieces = await regions
    assert pieces[0][0] == 100 and sum(n for _, n in pieces) == len(DATA) - 100
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(pieces))

    bad = bytearray(DATA)
    bad[5] ^= 1
    other = Spool(tmp_path / "other", 1 << 30)
    source = Trickle(bytes(bad))
    fetch = other.start(DIGEST, source)
    assert fetch is not None
    got: list[tuple[int, int]] = []

    async def take() -> None:
        async for region in fetch.regions(0, len(DATA)):
            got.append(region)

    task = asyncio.create_task(take())
    source.release(10)
    with pytest.raises(FetchFailed):
        await task
    assert sum(n for _, n in got) < len(DATA)  # the end never went out
    await spool.close()
    await other.close()


async def collect_regions(it: AsyncIterator[tuple[int, int]]) -> list[tuple[int, int]]:
    return [r async for r in it]


class Breaks(Trickle):
    """A source that fails after `at` bytes (its holder died), handing out the rest freely."""

    def __init__(self, data: bytes, at: int, source: SourceKind = SourceKind.PEER) -> None:
        super().__init__(data)
        self.at = at
        self.source = source  # type: ignore[misc]

    async def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        self.opens += 1
        pos = start
        while pos < end:
            if pos >= self.at:
                raise ConnectionError("its holder went away")
            stop = min(end, pos + self.chunk, self.at)
            yield self.data[pos:stop]
            pos = stop


@pytest.mark.parametrize("rescued_data", ["good", "bad"])
async def test_a_fetch_that_lost_its_source_continues_from_the_rescue_and_readers_never_notice(
    tmp_path: Path, rescued_data: str
) -> None:
    """The herd's designated fetcher died mid-blob: the node's fetch continues from what the
    rescue offers (the next fetcher, or upstream) from the byte it had, and the reader waiting
    on it gets the whole blob. A rescue with wrong bytes still fails the whole blob."""
    data = os.urandom(5 * 1024 * 1024)
    spool = Spool(tmp_path / "spool", 1 << 30)
    asked: list[int] = []

    async def rescue(pos: int) -> Breaks:
        asked.append(pos)
        rest = data if rescued_data == "good" else bytes(b ^ 1 for b in data)
        return Breaks(rest, len(data) + 1, SourceKind.UPSTREAM)

    fetch = spool.start(Digest.of(data), Breaks(data, 3 * 1024 * 1024 + 7), rescue)
    assert fetch is not None
    if rescued_data == "good":
        assert await collect(fetch.read(0, len(data))) == data
        # From the bytes it had written (a batch not yet written is fetched again).
        assert len(asked) == 1 and 0 < asked[0] <= 3 * 1024 * 1024 + 7
    else:
        with pytest.raises(FetchFailed):
            await collect(fetch.read(0, len(data)))
    await spool.close()
