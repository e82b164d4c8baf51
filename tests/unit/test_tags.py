"""The tag policy: which answer a tag gets when upstream, the node and peers disagree or fail."""

from __future__ import annotations

import pytest

from shoal.content.model import Descriptor
from shoal.oci import mediatypes as mt
from shoal.sources.local import LocalSource
from shoal.sources.tags import TagPolicy
from tests.fakes.registries import Servers, status
from tests.fakes.store import MemoryStore
from tests.fakes.upstream import Clock, add_image, ref, source


def node_with(name: str, body: bytes) -> tuple[LocalSource, Descriptor]:
    store = MemoryStore()
    return LocalSource(store), store.tag(name, mt.OCI_MANIFEST, body)


async def test_upstream_first_falls_back_to_the_node_then_to_the_last_answer(
    servers: Servers,
) -> None:
    clock = Clock()
    reg = await servers.registry()
    image = add_image(reg)
    r = ref(reg)
    assert r.image_name is not None
    local, held = node_with(r.image_name, b'{"older": "image"}')
    async with source(reg, clock=clock, tag_ttl=30) as up:
        policy = TagPolicy("upstream-first", up)
        # Upstream answers: its answer wins over the node's (maybe older) one.
        first = await policy.resolve(r, [local, up])
        assert first is not None and first.digest == image.digest
        clock.now += 60  # past the TTL: upstream is asked again, and is down
        reg.faults = [status(503)] * 9
        assert await policy.resolve(r, [local, up]) == held
        # The node lacks it too: upstream's last answer, however old.
        assert await policy.resolve(r, [LocalSource(MemoryStore()), up]) == first
        # A request that may not use upstream (a peer's) gets the node's answer only.
        assert await policy.resolve(r, [local]) == held
        reg.faults = []
        # Upstream says the tag is gone: final, whatever the node holds.
        del reg.manifests["v1"]
        clock.now += 60
        assert await policy.resolve(r, [local, up]) is None


async def test_peers_policy_asks_upstream_last_and_digest_only_never_resolves(
    servers: Servers,
) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    r = ref(reg)
    assert r.image_name is not None
    local, held = node_with(r.image_name, b'{"older": "image"}')
    async with source(reg) as up:
        assert await TagPolicy("peers", up).resolve(r, [local, up]) == held
        assert reg.seen == []  # the node knew: upstream was not asked
        found = await TagPolicy("peers", up).resolve(r, [LocalSource(MemoryStore()), up])
        assert found is not None and found.digest == image.digest
        assert await TagPolicy("digest-only", up).resolve(r, [local, up]) is None


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        TagPolicy("newest", None)
