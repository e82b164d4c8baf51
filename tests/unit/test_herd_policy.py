"""The herd's fan-out policy (daemon/shoal/herd/policy.py): who serves a blob to whom."""

from __future__ import annotations

from shoal.herd.policy import Fanout, Walk, upstream_chain

D = "sha256:aa"


def test_admits_up_to_the_limit_then_refers_to_its_children() -> None:
    f = Fanout(limit=2, spare=1)
    assert f.ask(D, "a").slot is not None
    assert f.ask(D, "b").slot is not None
    third = f.ask(D, "c")
    assert third.slot is None and not third.loop
    assert set(third.referrals) == {"a", "b"}
    assert f.children(D) == ["a", "b"]
    assert f.ask("sha256:other", "c").slot is not None  # the limit is per blob


def test_referrals_spread_later_askers_over_the_subtrees() -> None:
    f = Fanout(limit=2)
    f.ask(D, "a")
    f.ask(D, "b")
    firsts = [f.ask(D, f"x{i}").referrals[0] for i in range(4)]
    assert firsts == ["a", "b", "a", "b"]


def test_refuses_an_asker_that_is_one_of_its_sources() -> None:
    f = Fanout(limit=2)
    ans = f.ask(D, "up", upstream=upstream_chain("src", ["up", "root"]))
    assert ans.loop and ans.slot is None
    assert f.streams() == 0


def test_a_reattach_gets_one_spare_slot() -> None:
    f = Fanout(limit=1, spare=1)
    f.ask(D, "a")
    assert f.ask(D, "b").slot is None
    assert f.ask(D, "b", reattach=True).slot is not None
    assert f.ask(D, "c", reattach=True).slot is None
    assert f.streams() == 2


def test_release_frees_the_slot() -> None:
    f = Fanout(limit=1)
    slot = f.ask(D, "a").slot
    assert slot is not None
    assert f.ask(D, "b").slot is None
    slot.release()
    slot.release()  # twice is harmless
    assert f.ask(D, "b").slot is not None
    assert f.children(D) == ["b"]


def test_two_streams_of_one_child_are_both_freed() -> None:
    # A child resuming with Range while its first response has not closed yet holds two.
    f = Fanout(limit=3)
    first, second = f.ask(D, "a").slot, f.ask(D, "a").slot
    assert first is not None and second is not None
    second.release()
    first.release()
    assert f.streams() == 0


def test_limit_zero_is_a_star() -> None:
    f = Fanout(limit=0)
    assert all(f.ask(D, f"n{i}").slot is not None for i in range(100))


def test_walk_follows_referrals_depth_first() -> None:
    w = Walk(["root", "other"], me="me")
    assert w.next() == "root"
    w.referred("root", ["a", "b"])
    assert w.next() == "a"
    w.referred("a", ["a1"])
    assert w.next() == "a1"  # a's subtree before root's other child
    assert [w.next(), w.next()] == ["b", "other"]
    assert not w.reattach


def test_walk_never_asks_a_node_twice_nor_itself() -> None:
    w = Walk(["root", "root", "me", "a"], me="me")
    assert w.next() == "root"
    w.referred("root", ["a", "root", "me"])
    assert w.next() == "a"
    w.failed("a")
    w.add(["a", "b"])
    assert w.next() == "b"
    w.failed("b")
    asked = []
    while (n := w.next()) is not None:
        asked.append(n)
    assert "a" not in asked and "me" not in asked


def test_walk_asks_the_full_ones_again_as_a_reattach() -> None:
    w = Walk(["root", "x"], me="me")
    assert w.next() == "root"
    w.referred("root", ["a"])
    assert w.next() == "a"
    w.referred("a", [])
    w.failed("x")
    assert w.next() == "root" and w.reattach  # nearest the root first
    w.referred("root", ["z"])  # referrals are not followed any more
    assert w.next() == "a"
    assert w.next() is None


def test_walk_stops_following_referrals_after_max_hops() -> None:
    w = Walk(["root"], me="me", max_hops=2)
    assert w.next() == "root"
    w.referred("root", ["h1"])
    assert w.next() == "h1"
    w.referred("h1", ["h2"])
    assert w.next() == "h2"
    w.referred("h2", ["h3"])
    assert w.next() == "root"  # h3 not followed: the re-attach pass begins
    assert w.reattach
