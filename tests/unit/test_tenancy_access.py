"""What a node may share: learned statuses, opt-in rules, refreshes, and what content teaches."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from shoal.oci.digest import Digest
from shoal.oci.names import make_reference
from shoal.tenancy.access import (
    SHAREABLE_LABEL,
    Access,
    HeldImage,
    operator_choice,
    split_image_name,
)
from shoal.tenancy.policy import SharePolicy
from shoal.tenancy.status import Key, Status, StatusStore
from tests.fakes.upstream import Clock

REG = "registry.test:5000"


def d(n: int) -> str:
    return "sha256:" + f"{n:x}" * 64


def image(repo: str, target: int, *blobs: int, tag: str | None = "v1") -> HeldImage:
    name = f"{REG}/{repo}:{tag}" if tag else f"{REG}/{repo}@{d(target)}"
    digests = frozenset({d(target), *(d(b) for b in blobs)})
    return HeldImage(REG, repo, name, d(target), digests, frozenset({d(target)}), tag is not None)


class FakeProber:
    """Answers from a table; counts what it was asked."""

    def __init__(self, answers: dict[Key, Status]) -> None:
        self.answers = answers
        self.asked: list[Key] = []

    async def probe(self, key: Key) -> Status:
        self.asked.append(key)
        return self.answers.get(key, Status.UNKNOWN)


def access(
    tmp_path: Path,
    answers: dict[Key, Status] | None = None,
    policy: SharePolicy | None = None,
    clock: Clock | None = None,
) -> tuple[Access, FakeProber, list[int]]:
    clock = clock or Clock()
    changes: list[int] = []
    prober = FakeProber(answers or {})
    acc = Access(
        StatusStore(tmp_path / "access.json", clock),
        policy or SharePolicy(),
        prober,  # type: ignore[arg-type]
        refresh=100.0,
        on_change=lambda: changes.append(1),
        clock=clock,
    )
    return acc, prober, changes


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_only_images_served_anonymously_are_advertised_and_shared(tmp_path: Path) -> None:
    public, private = image("pub/app", 1, 2, 3), image("priv/app", 4, 5, 3)
    acc, prober, changes = access(tmp_path, {
        (REG, "pub/app", d(1)): Status.PUBLIC, (REG, "priv/app", d(4)): Status.PRIVATE,
    })  # fmt: skip
    assert acc.update([public, private]) == set()  # nothing learned yet: nothing shared
    await settle()
    assert sorted(prober.asked) == [(REG, "priv/app", d(4)), (REG, "pub/app", d(1))]
    assert changes  # the catalog is asked to sync again
    keys = acc.update([public, private])
    assert keys == {d(1), d(2), d(3), public.name}
    assert acc.tag_ok(public.name) and not acc.tag_ok(private.name)
    assert acc.blob_ok(Digest.parse(d(2))) and not acc.blob_ok(Digest.parse(d(5)))
    # A layer of the private image that the public one also has is public by it.
    assert acc.blob_ok(Digest.parse(d(3)))
    assert acc.withheld(d(5)) == "private" and acc.withheld(d(3)) is None
    # Manifests only under their own repository: naming another one proves nothing.
    assert acc.manifest_ok(REG, "pub/app", Digest.parse(d(1)))
    assert not acc.manifest_ok(REG, "priv/app", Digest.parse(d(1)))
    assert not acc.manifest_ok(REG, "priv/app", Digest.parse(d(4)))
    # A request naming no registry (a client using shoal as its registry) matches the repository.
    assert acc.manifest_ok(None, "pub/app", Digest.parse(d(1)))
    assert not acc.manifest_ok(None, "priv/app", Digest.parse(d(1)))
    assert not acc.manifest_ok(None, "priv/app", Digest.parse(d(4)))


async def test_a_public_image_turned_private_is_withdrawn_at_the_refresh(tmp_path: Path) -> None:
    clock = Clock()
    answers = {(REG, "app", d(1)): Status.PUBLIC}
    acc, prober, changes = access(tmp_path, answers, clock=clock)
    img = image("app", 1, 2)
    acc.update([img])
    await settle()
    assert acc.update([img]) == {d(1), d(2), img.name}
    answers[(REG, "app", d(1))] = Status.PRIVATE
    clock.now += 50  # before the refresh: not asked again
    acc.update([img])
    await settle()
    assert len(prober.asked) == 1
    clock.now += 100
    acc.update([img])
    await settle()
    assert len(prober.asked) == 2 and len(changes) == 2
    assert acc.update([img]) == set() and not acc.blob_ok(Digest.parse(d(2)))


async def test_an_outage_keeps_what_was_learned_and_retries_unknown(tmp_path: Path) -> None:
    clock = Clock()
    answers = {(REG, "app", d(1)): Status.PUBLIC}
    acc, prober, _ = access(tmp_path, answers, clock=clock)
    img = image("app", 1, 2)
    acc.update([img])
    await settle()
    del answers[(REG, "app", d(1))]  # the registry is down from now on
    clock.now += 200
    acc.update([img])
    await settle()
    assert len(prober.asked) == 2
    assert acc.update([img]) == {d(1), d(2), img.name}  # still shared: nothing new was learned
    await settle()
    assert len(prober.asked) == 2  # and not asked on every sync while the registry is down
    # An image never learned is asked again after a backoff, not on every sync.
    other = image("other", 7, 8)
    acc.update([img, other])
    await settle()
    acc.update([img, other])
    await settle()
    assert prober.asked.count((REG, "other", d(7))) == 1
    clock.now += 31
    acc.update([img, other])
    await settle()
    assert prober.asked.count((REG, "other", d(7))) == 2


async def test_statuses_are_remembered_across_restarts(tmp_path: Path) -> None:
    answers = {(REG, "app", d(1)): Status.PUBLIC}
    acc, _, _ = access(tmp_path, answers)
    img = image("app", 1, 2)
    acc.update([img])
    await settle()
    acc.update([img])
    restarted, prober, _ = access(tmp_path, {})  # the registry is down after the restart
    assert restarted.update([img]) == {d(1), d(2), img.name}
    await settle()
    assert prober.asked == []  # fresh enough: not even asked


async def test_opt_in_rules_share_regardless_and_unknown_only_when_asked(tmp_path: Path) -> None:
    private = {(REG, "priv/app", d(4)): Status.PRIVATE}
    imgs = [image("priv/app", 4, 5), image("imported/app", 6, 7)]  # the second: never learned
    for policy, shared in (
        (SharePolicy(), set()),
        (SharePolicy(unknown=True), {d(6), d(7)}),  # unknown only: private stays private
        (SharePolicy(registries=["registry.test:*"]), {d(4), d(5), d(6), d(7)}),
        (SharePolicy(repositories=[f"{REG}/priv/*"]), {d(4), d(5)}),
    ):
        acc, _, _ = access(tmp_path / str(id(policy)), private, policy)
        acc.update(imgs)
        await settle()
        keys = acc.update(imgs)
        assert {k for k in keys if k.startswith("sha256:")} == shared, policy.__dict__


async def test_content_that_arrived_anonymously_is_shareable_before_its_image(
    tmp_path: Path,
) -> None:
    clock = Clock()
    acc, _, changes = access(tmp_path, clock=clock)
    ref = make_reference(REG, "app", d(1))
    acc.learned(ref, Digest.parse(d(2)), "blob", "upstream")
    assert acc.blob_ok(Digest.parse(d(2)))
    clock.now += 101
    assert not acc.blob_ok(Digest.parse(d(2)))  # for one refresh period
    acc.learned(ref, Digest.parse(d(1)), "manifest", "peer")
    assert changes == [1]
    assert acc.update([image("app", 1, 2)]) == {d(1), d(2), f"{REG}/app:v1"}
    # A peer's view never overrides what the registry itself answered.
    acc.statuses.put((REG, "app", d(9)), Status.PRIVATE, "probe")
    acc.learned(ref, Digest.parse(d(9)), "manifest", "peer")
    assert acc.statuses.get((REG, "app", d(9))).status is Status.PRIVATE  # type: ignore[union-attr]
    acc.learned(ref, Digest.parse(d(9)), "manifest", "upstream")  # served anonymously: proof
    assert acc.statuses.get((REG, "app", d(9))).status is Status.PUBLIC  # type: ignore[union-attr]


def test_image_names_split_into_registry_and_repository() -> None:
    assert split_image_name("docker.io/library/alpine:3") == ("docker.io", "library/alpine")
    assert split_image_name(f"{REG}/a/b@{d(1)}") == (REG, "a/b")
    assert split_image_name("localhost:5000/app") == ("localhost:5000", "app")
    assert split_image_name("sha256:" + "1" * 64) is None


async def test_a_blob_containerd_pulled_itself_is_shared_by_where_its_labels_say(
    tmp_path: Path,
) -> None:
    """containerd labels what it pulls with the host (no port) and repository: the blob is
    shareable only if every registry on that host may share that repository."""
    host = REG.split(":")[0]
    opted = SharePolicy(registries=[REG])
    acc, _, _ = access(tmp_path, policy=opted)
    assert acc.committed_ok({f"containerd.io/distribution.source.{host}": "team/app"})
    assert not acc.committed_ok({})  # nothing says where it came from
    assert not acc.committed_ok({"containerd.io/distribution.source.other.example": "team/app"})
    # Another registry on the same host, not opted in: the blob may be its.
    acc.statuses.put((f"{host}:6000", "team/app", d(1)), Status.PRIVATE, "probe")
    assert not acc.committed_ok({f"containerd.io/distribution.source.{host}": "team/app"})
    # Learned public for the repository (any of its manifests): shareable without opt-in.
    plain, _, _ = access(tmp_path / "plain")
    source = {"containerd.io/distribution.source.docker.io": "library/alpine"}
    assert not plain.committed_ok(source)  # not yet learned: its image will be asked about
    plain.statuses.put(("docker.io", "library/alpine", d(2)), Status.PUBLIC, "probe")
    assert plain.committed_ok(source)
    # --share-unknown covers registries that can never be asked, not those not asked yet.
    unknown = SharePolicy(unknown=True)
    acc2 = Access(StatusStore(None), unknown, None, listed=["docker.io"])
    assert not acc2.committed_ok({"containerd.io/distribution.source.docker.io": "library/x"})
    assert acc2.committed_ok({"containerd.io/distribution.source.air.gapped": "team/app"})


async def test_the_operators_label_shares_a_loaded_image_or_keeps_it_private(
    tmp_path: Path,
) -> None:
    """`shoal load` labels what it loads shareable (no registry to ask on an air-gapped site);
    `--private` labels it never shared, even where its registry serves it anonymously."""
    loaded = replace(image("site/app", 1, 2), shared=True)
    kept = replace(image("pub/app", 4, 5), shared=False)
    acc, prober, _ = access(tmp_path, {(REG, "pub/app", d(4)): Status.PUBLIC})
    assert acc.update([loaded, kept]) == {d(1), d(2), loaded.name}
    await settle()
    assert prober.asked == []  # the operator decided: no registry is asked about either
    assert acc.tag_ok(loaded.name) and not acc.tag_ok(kept.name)
    assert not acc.blob_ok(Digest.parse(d(5))) and acc.withheld(d(5)) == "private"
    assert operator_choice({SHAREABLE_LABEL: "true"}) is True
    assert operator_choice({SHAREABLE_LABEL: "false"}) is False
    assert operator_choice({SHAREABLE_LABEL: "yes please"}) is None
