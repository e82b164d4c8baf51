"""Bearer and Basic challenges, the token cache, and where credentials may (never) go."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest
from yarl import URL

from shoal.upstream import UpstreamDenied
from shoal.upstream.allowlist import Endpoint
from shoal.upstream.auth import token_lifetime
from shoal.upstream.challenge import Challenge, parse_challenges, pick
from shoal.upstream.credentials import Credentials, parse_config, registry_key
from tests.fakes.registries import Servers, basic
from tests.fakes.upstream import Clock, add_image, read_all, ref, source, write_config

# --- parsing ---------------------------------------------------------------------------------


def test_parse_docker_hub_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert parse_challenges([header]) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/alpine:pull",
            },
        )
    ]


def test_parse_several_challenges_and_garbage() -> None:
    got = parse_challenges(
        ['Basic realm="a\\"b", Bearer realm=https://t/x , error="invalid_token"', "Negotiate ab=="]
    )
    assert got[0] == Challenge("basic", {"realm": 'a"b'})
    assert got[1] == Challenge("bearer", {"realm": "https://t/x", "error": "invalid_token"})
    assert got[2].scheme == "negotiate"
    # Bearer is preferred; Basic only helps with credentials.
    assert pick(got, False) == got[1]
    assert pick([got[0]], False) is None
    assert pick([got[0]], True) == got[0]
    assert parse_challenges(["", ",,,", "==="]) == []


def test_token_lifetime() -> None:
    assert token_lifetime(300) == 290  # minus slack
    assert token_lifetime(None) == 54  # 60 s by default
    assert token_lifetime("300") == 54
    assert token_lifetime(-5) == 54
    assert token_lifetime(True) == 54


def test_credentials_file_formats() -> None:
    doc = {
        "auths": {
            "https://index.docker.io/v1/": {
                "auth": base64.b64encode(b"hub:pw:with:colons").decode()
            },
            "ghcr.io": {"username": "gh", "password": "tok"},
            "Quay.IO/": {"auth": base64.b64encode(b"q:p").decode()},
            "broken.io": {"auth": "%%%"},
            "nopass.io": {"auth": base64.b64encode(b"nocolon").decode()},
            "oauth.io": {"identitytoken": "refresh"},
            "not a host": {"username": "x", "password": "y"},
        }
    }
    got = parse_config(json.dumps(doc).encode())
    assert got == {
        "docker.io": ("hub", "pw:with:colons"),
        "ghcr.io": ("gh", "tok"),
        "quay.io": ("q", "p"),
    }
    assert registry_key("http://127.0.0.1:5000/v2/") == "127.0.0.1:5000"
    with pytest.raises(ValueError):
        parse_config(b'{"credHelpers": {}}')


def test_credentials_reload_keeps_last_good_and_forgets_removed(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "config.json"
    write_config(path, {"ghcr.io": {"username": "a", "password": "1"}})
    creds = Credentials(str(path), check_interval=1.0, clock=clock)
    assert creds.lookup("ghcr.io") == ("a", "1")
    path.write_text("{half written")
    clock.now += 2
    assert creds.lookup("ghcr.io") == ("a", "1")
    write_config(path, {"ghcr.io": {"username": "b", "password": "2"}})
    os.utime(path, ns=(1, 10**18))  # an mtime surely different from the last write
    assert creds.lookup("ghcr.io") == ("a", "1")  # not checked again within the interval
    clock.now += 2
    assert creds.lookup("ghcr.io") == ("b", "2")
    path.unlink()
    clock.now += 2
    assert creds.lookup("ghcr.io") is None


# --- the token flow --------------------------------------------------------------------------


async def test_401_token_200_anonymously(servers: Servers) -> None:
    tokens = await servers.tokens()
    reg = await servers.registry(auth="bearer", token_server=tokens)
    image = add_image(reg)
    async with source(reg) as src:
        desc = await src.resolve(ref(reg))
    assert desc is not None and desc.digest == image.digest
    assert [(s.method, s.authorization) for s in reg.seen] == [
        ("HEAD", None),
        ("HEAD", "Bearer tok-1"),
    ]
    assert len(tokens.seen) == 1
    issued = tokens.issued["tok-1"]
    assert (issued.service, issued.scope, issued.authorization) == (
        "fake-registry",
        "repository:team/app:pull",
        None,
    )
    assert reg.seen[0].headers["user-agent"].startswith("shoal/")


async def test_token_cached_per_scope_and_shared_by_concurrent_requests(servers: Servers) -> None:
    tokens = await servers.tokens()
    reg = await servers.registry(auth="bearer", token_server=tokens)
    image = add_image(reg)
    async with source(reg) as src:
        results = await asyncio.gather(
            *[src.find(ref(reg), image.layer_digest, "blob") for _ in range(10)],
            *[src.resolve(ref(reg)) for _ in range(5)],
        )
        assert all(r is not None for r in results)
        assert await read_all(results[0]) == image.layer
        assert await src.find(ref(reg), image.digest, "manifest") is not None
        assert len(tokens.seen) == 1
        first_phase = len(reg.seen)
        # Another repository is another scope: another token, fetched before asking.
        assert await src.find(ref(reg, repo="team/other"), image.layer_digest, "blob")
        assert len(tokens.seen) == 2
    assert {i.scope for i in tokens.issued.values()} == {
        "repository:team/app:pull",
        "repository:team/other:pull",
    }
    # Only the first requests met a challenge (10 finds and the 5 resolves' one shared HEAD);
    # all later ones carried a token up front.
    assert sum(1 for s in reg.seen if s.authorization is None) == 11
    assert all(s.authorization for s in reg.seen[first_phase:])


async def test_token_refetched_after_expiry(servers: Servers) -> None:
    clock = Clock()
    tokens = await servers.tokens(expires_in=100)
    reg = await servers.registry(auth="bearer", token_server=tokens)
    image = add_image(reg)
    async with source(reg, clock=clock) as src:
        assert await src.find(ref(reg), image.digest, "manifest") is not None
        clock.now += 85  # within 100 s minus slack
        assert await src.find(ref(reg), image.digest, "manifest") is not None
        assert len(tokens.seen) == 1
        clock.now += 10  # past it
        assert await src.find(ref(reg), image.digest, "manifest") is not None
        assert len(tokens.seen) == 2


async def test_rejected_token_is_replaced_once(servers: Servers) -> None:
    tokens = await servers.tokens()
    reg = await servers.registry(auth="bearer", token_server=tokens)
    image = add_image(reg)
    async with source(reg) as src:
        assert await src.find(ref(reg), image.digest, "manifest") is not None
        tokens.issued.clear()  # revoked early
        assert await src.find(ref(reg), image.digest, "manifest") is not None
        assert len(tokens.seen) == 2
        # A registry that keeps refusing: the request is repeated once, not forever.
        tokens.users = {"nobody": "x"}
        tokens.issued.clear()
        before = len(reg.seen)
        assert await src.find(ref(reg), image.digest, "manifest") is None
        with pytest.raises(UpstreamDenied):
            await src.lookup(ref(reg))
        assert len(reg.seen) - before <= 2


async def test_basic_credentials_go_to_the_declared_realm_only(
    servers: Servers, tmp_path: Path
) -> None:
    tokens = await servers.tokens(users={"alice": "s3cret"})
    reg = await servers.registry(auth="bearer", token_server=tokens)
    image = add_image(reg)
    creds = write_config(
        tmp_path / "c.json", {reg.host: {"username": "alice", "password": "s3cret"}}
    )
    async with source(reg, credentials=creds) as src:
        assert await src.resolve(ref(reg)) is not None
        assert await read_all(await src.find(ref(reg), image.layer_digest, "blob")) == image.layer
    assert [s.authorization for s in tokens.seen] == [basic("alice", "s3cret")]
    assert all(s.authorization in (None, "Bearer tok-1") for s in reg.seen)


async def test_no_credentials_means_denied(servers: Servers) -> None:
    tokens = await servers.tokens(users={"alice": "s3cret"})
    reg = await servers.registry(auth="bearer", token_server=tokens)
    add_image(reg)
    async with source(reg) as src:
        assert await src.resolve(ref(reg)) is None
        with pytest.raises(UpstreamDenied):
            await src.lookup(ref(reg))
    assert tokens.seen and all(s.authorization is None for s in tokens.seen)


async def test_credentials_of_one_registry_never_reach_another(
    servers: Servers, tmp_path: Path
) -> None:
    tokens = await servers.tokens()  # one token service for both, as on a shared auth host
    reg_a = await servers.registry(auth="bearer", token_server=tokens, service="a")
    reg_b = await servers.registry(auth="bearer", token_server=tokens, service="b")
    basic_a = await servers.registry(auth="basic", users={"ua": "pa"})
    basic_b = await servers.registry(auth="basic", users={"ub": "pb"})
    images = {r.host: add_image(r) for r in (reg_a, reg_b, basic_a, basic_b)}
    creds = write_config(
        tmp_path / "c.json",
        {
            reg_a.host: {"username": "alice", "password": "a-secret"},
            basic_a.host: {"username": "ua", "password": "pa"},
            basic_b.host: {"username": "ub", "password": "pb"},
        },
    )
    async with source(reg_a, reg_b, basic_a, basic_b, credentials=creds) as src:
        for reg in (reg_a, reg_b, basic_a, basic_b):
            blob = await src.find(ref(reg), images[reg.host].layer_digest, "blob")
            assert blob is not None, reg.host
            assert await read_all(blob) == images[reg.host].layer
    by_service = {i.service: i for i in tokens.issued.values()}
    assert by_service["a"].authorization == basic("alice", "a-secret")
    assert by_service["b"].authorization is None
    tok_a, tok_b = f"Bearer {by_service['a'].token}", f"Bearer {by_service['b'].token}"
    assert {s.authorization for s in reg_a.seen} == {None, tok_a}
    assert {s.authorization for s in reg_b.seen} == {None, tok_b}
    assert {s.authorization for s in basic_a.seen} == {None, basic("ua", "pa")}
    assert {s.authorization for s in basic_b.seen} == {None, basic("ub", "pb")}


async def test_basic_challenge_then_sent_up_front(servers: Servers, tmp_path: Path) -> None:
    reg = await servers.registry(auth="basic", users={"u": "p"})
    image = add_image(reg)
    creds = write_config(
        tmp_path / "c.json", {reg.host: {"auth": base64.b64encode(b"u:p").decode()}}
    )
    async with source(reg, credentials=creds) as src:
        assert await src.resolve(ref(reg)) is not None
        assert await src.find(ref(reg), image.digest, "manifest") is not None
    assert [s.authorization for s in reg.seen] == [None, basic("u", "p"), basic("u", "p")]
    async with source(reg) as src:  # no credentials: nothing to answer Basic with
        with pytest.raises(UpstreamDenied):
            await src.lookup(ref(reg))
    assert reg.seen[-1].authorization is None


async def test_credentials_file_change_is_picked_up(servers: Servers, tmp_path: Path) -> None:
    clock = Clock()
    tokens = await servers.tokens(users={"alice": "new"})
    reg = await servers.registry(auth="bearer", token_server=tokens)
    add_image(reg)
    path = tmp_path / "c.json"
    creds = write_config(path, {reg.host: {"username": "alice", "password": "old"}})
    async with source(reg, credentials=creds, clock=clock) as src:
        with pytest.raises(UpstreamDenied):
            await src.lookup(ref(reg))
        write_config(path, {reg.host: {"username": "alice", "password": "new"}})
        os.utime(path, ns=(1, 10**18))
        clock.now += 5
        assert await src.lookup(ref(reg)) is not None  # a failure is not cached
    assert tokens.seen[-1].authorization == basic("alice", "new")


async def test_plain_http_realm_of_https_registry_gets_no_credentials(
    servers: Servers, tmp_path: Path
) -> None:
    tokens = await servers.tokens()
    creds = write_config(tmp_path / "c.json", {"secure.test": {"username": "u", "password": "p"}})
    async with source("secure.test", credentials=creds, insecure=[]) as src:
        endpoint = src.endpoint("secure.test")
        assert endpoint == Endpoint("secure.test", URL("https://secure.test"))
        header = f'Bearer realm="{tokens.realm}",service="s"'
        got = await src.auth.on_challenge(endpoint, "repository:a:pull", [header], None)
    assert got is not None and got.header == "Bearer tok-1"
    assert got.origin == ("https", "secure.test", 443)  # the token goes to the registry only
    assert [s.authorization for s in tokens.seen] == [None]
