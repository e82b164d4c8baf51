"""Peer request signatures and redirect capabilities: what each opens, and for how long."""

from __future__ import annotations

import pytest

from shoal.tenancy.keys import ClusterKey
from shoal.tenancy.tokens import (
    CAPABILITY_LIFETIME,
    WINDOW,
    Refused,
    Target,
    check_capability,
    check_signature,
    mint_capability,
    sign,
)

KEY = ClusterKey(b"a cluster key for the token tests, long enough")
A = "/v2/team/app/blobs/sha256:" + "a" * 64
B = "/v2/team/app/blobs/sha256:" + "b" * 64
NOW = 1_800_000_000.0


def cap_target(path: str = A, ns: str | None = "registry.test", fetch: bool = False) -> Target:
    return Target("GET", path, ns, fetch)


def refusal(call: object, *args: object) -> Refused:
    with pytest.raises(Refused) as err:
        call(*args)  # type: ignore[operator]
    return err.value


def test_a_capability_opens_its_object_at_its_holder_until_it_expires() -> None:
    token = mint_capability(KEY.capabilities, "holder", cap_target(), NOW)
    check_capability(KEY.capabilities, token, "holder", cap_target(), NOW + 1)
    check_capability(KEY.capabilities, token, "holder", cap_target(), NOW + CAPABILITY_LIFETIME)


def test_a_capability_for_digest_a_does_not_open_digest_b() -> None:
    token = mint_capability(KEY.capabilities, "holder", cap_target(A), NOW)
    err = refusal(check_capability, KEY.capabilities, token, "holder", cap_target(B), NOW)
    assert (err.status, err.reason) == (403, "bad_capability")


def test_an_expired_capability_is_refused() -> None:
    token = mint_capability(KEY.capabilities, "holder", cap_target(), NOW)
    later = NOW + CAPABILITY_LIFETIME + 1
    err = refusal(check_capability, KEY.capabilities, token, "holder", cap_target(), later)
    assert (err.status, err.reason) == (403, "expired_capability")


@pytest.mark.parametrize(
    ("holder", "target"),
    [
        ("other-holder", cap_target()),  # minted for another node
        ("holder", cap_target(ns="other.registry")),
        ("holder", cap_target(fetch=True)),  # a plain read cannot be turned into a fetch
        ("holder", cap_target("/v2/other/app/blobs/sha256:" + "a" * 64)),
    ],
)
def test_a_capability_is_bound_to_holder_ns_fetch_mark_and_repository(
    holder: str, target: Target
) -> None:
    token = mint_capability(KEY.capabilities, "holder", cap_target(), NOW)
    err = refusal(check_capability, KEY.capabilities, token, holder, target, NOW)
    assert err.reason == "bad_capability"


def test_capabilities_of_another_key_or_use_do_not_pass() -> None:
    other = ClusterKey(b"another cluster's key, also long enough")
    token = mint_capability(other.capabilities, "holder", cap_target(), NOW)
    assert refusal(check_capability, KEY.capabilities, token, "holder", cap_target(), NOW)
    # A peer signature's MAC under the request key is no capability.
    forged = f"{int(NOW + 30)}.{sign(KEY.peer_requests, cap_target(), 'holder', NOW).split()[3]}"
    assert refusal(check_capability, KEY.capabilities, forged, "holder", cap_target(), NOW)
    # Each use has a key of its own, none of them the secret itself.
    assert len({KEY.peer_requests, KEY.capabilities, bytes.fromhex(KEY.p2p_psk())}) == 3


def test_a_capability_expiring_too_far_ahead_is_refused() -> None:
    token = mint_capability(KEY.capabilities, "holder", cap_target(), NOW, lifetime=3600)
    err = refusal(check_capability, KEY.capabilities, token, "holder", cap_target(), NOW)
    assert err.reason == "bad_capability"


@pytest.mark.parametrize("token", ["", "123", "abc.def", "12.", ".mac", "1.2.3"])
def test_malformed_capabilities_are_refused(token: str) -> None:
    err = refusal(check_capability, KEY.capabilities, token, "holder", cap_target(), NOW)
    assert err.status == 403


def head(path: str = A, fetch: bool = False, ns: str | None = "registry.test") -> Target:
    return Target("HEAD", path, ns, fetch)


def test_a_signed_request_names_its_sender() -> None:
    header = sign(KEY.peer_requests, head(), "node-2", NOW)
    assert check_signature(KEY.peer_requests, header, head(), NOW + 5) == "node-2"
    assert check_signature(KEY.peer_requests, header, head(), NOW - 5) == "node-2"


@pytest.mark.parametrize(
    "target",
    [
        head(B),
        head(fetch=True),  # the fetch mark is signed: it cannot be added
        head(ns="other.registry"),
        Target("GET", A, "registry.test", False),
    ],
)
def test_a_signature_covers_method_path_ns_and_fetch_mark(target: Target) -> None:
    header = sign(KEY.peer_requests, head(), "node-2", NOW)
    err = refusal(check_signature, KEY.peer_requests, header, target, NOW)
    assert (err.status, err.reason) == (403, "bad_signature")


def test_a_stale_signature_is_refused_and_a_changed_sender_does_not_match() -> None:
    header = sign(KEY.peer_requests, head(), "node-2", NOW)
    err = refusal(check_signature, KEY.peer_requests, header, head(), NOW + WINDOW + 1)
    assert err.reason == "stale_signature"
    parts = header.split(" ")
    renamed = " ".join([parts[0], "node-3", *parts[2:]])
    assert refusal(check_signature, KEY.peer_requests, renamed, head(), NOW).reason == (
        "bad_signature"
    )
    other = ClusterKey(b"another cluster's key, also long enough")
    assert refusal(check_signature, other.peer_requests, header, head(), NOW)


def test_a_short_cluster_key_is_rejected() -> None:
    with pytest.raises(ValueError):
        ClusterKey(b"short")
    assert len(KEY.p2p_psk()) == 64 and KEY.p2p_psk() != ClusterKey(b"x" * 40).p2p_psk()
