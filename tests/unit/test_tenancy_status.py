"""Learning whether a registry serves content anonymously, and remembering it across restarts."""

from __future__ import annotations

from pathlib import Path

from shoal.tenancy.status import Prober, Status, StatusStore
from tests.fakes.registries import Servers, status
from tests.fakes.upstream import Clock, add_image, source


async def test_anonymous_answers_decide_public_and_private(servers: Servers) -> None:
    open_reg = await servers.registry()
    tokens = await servers.tokens(users={"alice": "pw"})  # tokens for alice only
    bearer = await servers.registry(auth="bearer", token_server=tokens)
    basic = await servers.registry(auth="basic", users={"alice": "pw"})
    images = {reg.host: add_image(reg) for reg in (open_reg, bearer, basic)}
    async with source(open_reg, bearer, basic) as up:
        prober = Prober(up)

        async def probe(host: str, digest: str | None = None) -> Status:
            return await prober.probe((host, "team/app", digest or str(images[host].digest)))

        assert await probe(open_reg.host) is Status.PUBLIC
        assert await probe(bearer.host) is Status.PRIVATE  # no token for anonymous
        assert await probe(basic.host) is Status.PRIVATE
        # Held here but not there: it cannot be shown public.
        assert await probe(open_reg.host, "sha256:" + "0" * 64) is Status.PRIVATE
    heads = [s for s in servers.seen() if s.method == "HEAD"]
    assert heads and all(s.authorization is None for s in heads)  # never with credentials


async def test_unreachable_or_unlisted_registries_leave_it_unknown(servers: Servers) -> None:
    flaky = await servers.registry()
    image = add_image(flaky)
    flaky.faults = [status(503)] * 10
    async with source(flaky) as up:
        prober = Prober(up)
        assert await prober.probe((flaky.host, "team/app", str(image.digest))) is Status.UNKNOWN
        seen = len(servers.seen())
        unlisted = ("not-listed.example:5000", "team/app", str(image.digest))
        assert await prober.probe(unlisted) is Status.UNKNOWN
        assert len(servers.seen()) == seen and prober.requests == 1  # never contacted


def test_statuses_survive_a_restart_and_unknown_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    clock = Clock()
    store = StatusStore(path, clock)
    key = ("registry.test", "team/app", "sha256:" + "1" * 64)
    assert store.put(key, Status.PUBLIC, "probe")
    assert not store.put(key, Status.UNKNOWN, "probe")
    assert not store.put(key, Status.PUBLIC, "probe")  # unchanged
    store.save()
    again = StatusStore(path, clock)
    learned = again.get(key)
    assert learned is not None and learned.status is Status.PUBLIC and learned.how == "probe"
    assert again.put(key, Status.PRIVATE, "probe")  # a change


def test_prune_forgets_what_the_node_no_longer_holds(tmp_path: Path) -> None:
    clock = Clock()
    store = StatusStore(tmp_path / "access.json", clock)
    kept, gone = ("r", "a", "sha256:" + "1" * 64), ("r", "b", "sha256:" + "2" * 64)
    store.put(kept, Status.PUBLIC, "probe")
    store.put(gone, Status.PRIVATE, "probe")
    store.prune({kept}, younger_than=10)
    assert store.get(gone) is not None  # learned just now
    clock.now += 11
    store.prune({kept}, younger_than=10)
    assert store.get(gone) is None and store.get(kept) is not None


def test_an_unreadable_status_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    path.write_text("{not json")
    assert StatusStore(path).get(("r", "a", "sha256:" + "1" * 64)) is None
    path.write_text('{"statuses": [["r", "a", "d", "no-such-status", 1, "probe"], 5]}')
    assert StatusStore(path).get(("r", "a", "d")) is None
