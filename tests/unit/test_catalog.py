"""The catalog keeps the router's advertisements equal to what the node holds, across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.catalog import Catalog, tag_key
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
