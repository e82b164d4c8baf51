"""The catalog keeps the router's advertisements equal to what the node holds, across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shoal.catalog import Catalog, tag_key
from shoal.containerd import Event
from shoal.routing import Peer
from tests.fakes.router import MemoryNetwork, MemoryRouter


class Holdings:
    def __init__(self, *keys: str) -> None:
        self.keys = set(keys)

    async def __call__(self, client: object) -> set[str]:
        return set(self.keys)


async def providers(router: MemoryRouter, key: str) -> list[str]:
    return [p.id async for p in router.lookup(key)]


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("docker.io/library/alpine:3", "docker.io/library/alpine:3"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
        ("127.0.0.1:5000/team/app@sha256:" + "a" * 64, None),  # digest-only record
        ("sha256:" + "a" * 64, None),  # CRI's config-digest record
        ("127.0.0.1:5000/team/app", None),  # no tag
    ],
)
def test_tag_keys(name: str, key: str | None) -> None:
    assert tag_key(name) == key


async def test_only_differences_are_sent_and_a_restart_withdraws_leftovers(tmp_path: Path) -> None:
    net = MemoryNetwork()
    me, other = Peer("me", "10.0.0.1:30020"), Peer("other", "10.0.0.2:30020")
    observer = MemoryRouter(net, other)
    await observer.start()
    router = MemoryRouter(net, me)
    await router.start()
    state = tmp_path / "advertised.json"
    held = Holdings("sha256:a", "sha256:b", "reg/x:1")
    catalog = Catalog(None, router, 60, read_keys=held, state_file=state)  # type: ignore[arg-type]
    await catalog.sync()
    assert await providers(observer, "sha256:b") == ["me"]
    held.keys.discard("reg/x:1")
    await catalog.sync()
    assert await providers(observer, "reg/x:1") == []
    assert await providers(observer, "sha256:a") == ["me"]

    # Killed without withdrawing anything; its records stay on the network. On restart the
    # node no longer holds sha256:b: the new run must withdraw it, from the saved state alone.
    held.keys.discard("sha256:b")
    net.providers["sha256:a"].pop("me")  # meanwhile this record reached its TTL on the peers
    again = MemoryRouter(net, me)
    await again.start()
    restarted = Catalog(None, again, 60, read_keys=held, state_file=state)  # type: ignore[arg-type]
    assert await providers(observer, "sha256:b") == ["me"]
    await restarted.sync()
    assert await providers(observer, "sha256:b") == []
    assert await providers(observer, "sha256:a") == ["me"]


def content_create(digest: str) -> Event:
    return Event("/content/create", "k8s.io", "containerd.events.ContentCreate", digest=digest)


class Store:
    """The node's containerd as the catalog sees it: image keys, and which blobs are held."""

    def __init__(self, *image_keys: str) -> None:
        self.image_keys = set(image_keys)
        self.blobs: set[str] = set()
        self.reads = 0

    async def read_keys(self, client: object) -> set[str]:
        self.reads += 1
        return set(self.image_keys)

    async def holds(self, client: object, digest: str) -> bool:
        return digest in self.blobs


async def routers() -> tuple[MemoryRouter, MemoryRouter]:
    net = MemoryNetwork()
    observer = MemoryRouter(net, Peer("other", "10.0.0.2:30020"))
    router = MemoryRouter(net, Peer("me", "10.0.0.1:30020"))
    await observer.start()
    await router.start()
    return router, observer


async def test_a_committed_blob_is_advertised_before_any_image_names_it() -> None:
    """containerd 2.1+ reports each committed blob (/content/create): a layer of a pull still
    under way is advertised without re-reading the store, and stays advertised while
    containerd holds it, also across full rebuilds that find no image naming it."""
    router, observer = await routers()
    store = Store("sha256:old", "reg/old:1")
    catalog = Catalog(None, router, 3600, read_keys=store.read_keys, holds=store.holds)  # type: ignore[arg-type]
    await catalog.sync()
    store.blobs.add("sha256:layer")
    await catalog._on_event(content_create("sha256:layer"))
    reads = store.reads
    await catalog.add_committed()
    assert await providers(observer, "sha256:layer") == ["me"]
    assert store.reads == reads  # advertised without a full rebuild
    await catalog.sync()  # e.g. another image's event: the layer is still held
    assert await providers(observer, "sha256:layer") == ["me"]
    store.image_keys |= {"sha256:layer", "sha256:manifest"}  # the pull created its image
    await catalog.sync()
    assert catalog._committed == set()  # the image covers it now
    assert await providers(observer, "sha256:layer") == ["me"]

    # A committed blob of a pull that failed: withdrawn once containerd no longer holds it.
    store.blobs.add("sha256:orphan")
    await catalog._on_event(content_create("sha256:orphan"))
    await catalog.add_committed()
    assert await providers(observer, "sha256:orphan") == ["me"]
    store.blobs.discard("sha256:orphan")  # its lease expired, GC removed it (no event)
    await catalog.sync()
    assert await providers(observer, "sha256:orphan") == []
    assert await providers(observer, "sha256:old") == ["me"]


async def test_a_committed_blob_is_advertised_only_when_it_may_be_shared() -> None:
    """A blob fetched with credentials reached the node privately: committed, it stays
    unadvertised until what it belongs to is shown shareable."""
    router, observer = await routers()
    store = Store("sha256:old")
    shared: set[str] = {"sha256:public"}

    async def shareable(digest: str) -> bool:
        return digest in shared

    catalog = Catalog(None, router, 3600, read_keys=store.read_keys, holds=store.holds,  # type: ignore[arg-type]
                      shareable=shareable)  # fmt: skip
    await catalog.sync()
    for digest in ("sha256:public", "sha256:private"):
        store.blobs.add(digest)
        await catalog._on_event(content_create(digest))
    await catalog.add_committed()
    assert await providers(observer, "sha256:public") == ["me"]
    assert await providers(observer, "sha256:private") == []
    await catalog.sync()
    assert await providers(observer, "sha256:private") == []
    shared.add("sha256:private")  # e.g. its image turned out to be public
    await catalog.sync()
    assert await providers(observer, "sha256:private") == ["me"]


async def test_a_blob_committed_while_a_rebuild_checks_sharing_does_not_stop_the_catalog() -> None:
    """The sharing check awaits (tenancy asks the registry); containerd reports another
    committed blob meanwhile. The rebuild in progress must still finish, and advertise both
    (the soak found the catalog stopped: the set changed size while it was iterated)."""
    router, observer = await routers()
    store = Store()
    store.blobs |= {"sha256:first", "sha256:second"}

    async def shareable(digest: str) -> bool:
        if digest == "sha256:first" and "sha256:second" not in catalog._committed:
            await catalog._on_event(content_create("sha256:second"))  # arrives mid-check
        await asyncio.sleep(0)
        return True

    catalog = Catalog(None, router, 3600, read_keys=store.read_keys, holds=store.holds,  # type: ignore[arg-type]
                      shareable=shareable)  # fmt: skip
    await catalog._on_event(content_create("sha256:first"))
    await catalog.sync()
    await catalog.sync()  # the next rebuild picks up what arrived during the last
    assert await providers(observer, "sha256:first") == ["me"]
    assert await providers(observer, "sha256:second") == ["me"]


async def test_a_rebuild_that_fails_on_a_fault_of_ours_is_retried_not_the_end_of_advertising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router, observer = await routers()
    store = Store("sha256:old")
    faults = [RuntimeError("a bug")]

    async def read_keys(client: object) -> set[str]:
        if faults:
            raise faults.pop()
        return await store.read_keys(client)

    catalog = Catalog(None, router, 0.2, read_keys=read_keys, holds=store.holds)  # type: ignore[arg-type]
    loop = asyncio.create_task(catalog._rebuild_loop())
    try:
        async with asyncio.timeout(10):
            while await providers(observer, "sha256:old") != ["me"]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        loop.cancel()
    assert not faults and "catalog rebuild failed" in caplog.text  # said once, with its cause


async def test_content_events_advertise_promptly_and_never_delay_the_resync() -> None:
    router, observer = await routers()
    store = Store("sha256:old")
    catalog = Catalog(None, router, 0.5, read_keys=store.read_keys, holds=store.holds)  # type: ignore[arg-type]
    await catalog.sync()
    loop = asyncio.create_task(catalog._rebuild_loop())
    try:
        store.blobs.add("sha256:new")
        await catalog._on_event(content_create("sha256:new"))
        async with asyncio.timeout(10):
            while await providers(observer, "sha256:new") != ["me"]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        # A steady trickle of commits (a long pull) must not hold off the periodic rebuild,
        # which is what withdraws content deleted without an event.
        reads = store.reads
        async with asyncio.timeout(20):
            i = 0
            while store.reads < reads + 2:
                store.blobs.add(f"sha256:n{i}")
                await catalog._on_event(content_create(f"sha256:n{i}"))
                await asyncio.sleep(0.1)
                i += 1
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_a_quarantined_digest_is_withdrawn_and_kept_out_until_included_again() -> None:
    """Quarantine (shoal.integrity) withdraws a digest at once; neither a full rebuild nor a
    /content/create of it advertises it again until it is included again."""
    router, observer = await routers()
    store = Store("sha256:bad", "sha256:good")
    catalog = Catalog(None, router, 3600, read_keys=store.read_keys, holds=store.holds)  # type: ignore[arg-type]
    await catalog.sync()
    await catalog.exclude("sha256:bad")
    await catalog.exclude("sha256:late")
    assert await providers(observer, "sha256:bad") == []
    await catalog.sync()
    store.blobs.add("sha256:late")
    await catalog._on_event(content_create("sha256:late"))
    await catalog.add_committed()
    assert await providers(observer, "sha256:bad") == []
    assert await providers(observer, "sha256:late") == []
    assert await providers(observer, "sha256:good") == ["me"]
    loop = asyncio.create_task(catalog._rebuild_loop())
    try:
        catalog.include("sha256:bad")  # a new copy matched: the loop advertises it soon
        async with asyncio.timeout(10):
            while await providers(observer, "sha256:bad") != ["me"]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
