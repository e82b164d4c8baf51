"""Only allowed registries are contacted; anything else causes no connection and no DNS lookup."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from shoal.config import Settings
from shoal.oci.digest import Digest
from shoal.oci.errors import RegistryError
from shoal.oci.names import Reference
from shoal.upstream import AllowList, UpstreamSource
from tests.fakes.registries import Servers
from tests.fakes.upstream import RecordingResolver, add_image, ref, source


def test_docker_hub_and_https_defaults() -> None:
    allow = AllowList(Settings.defaults().mirror_registries)
    hub = allow.endpoint("docker.io")
    assert hub is not None and str(hub.base) == "https://registry-1.docker.io"
    ghcr = allow.endpoint("ghcr.io")
    assert ghcr is not None and str(ghcr.base) == "https://ghcr.io"
    # Docker Hub's aliases are the same registry as containerd names it.
    assert allow.endpoint("index.docker.io") == hub


def test_insecure_registries_use_plain_http() -> None:
    allow = AllowList(["127.0.0.1:5000", "reg.internal:8443"], insecure=["127.0.0.1:5000"])
    local = allow.endpoint("127.0.0.1:5000")
    assert local is not None and str(local.base) == "http://127.0.0.1:5000"
    internal = allow.endpoint("reg.internal:8443")
    assert internal is not None and str(internal.base) == "https://reg.internal:8443"
    assert (
        str(internal.url("/v2/a/b/manifests/v1")) == "https://reg.internal:8443/v2/a/b/manifests/v1"
    )


@pytest.mark.parametrize(
    "ns",
    [
        None,
        "",
        "evil.example",
        "ghcr.io:443",  # another name than the one listed, though it may be the same server
        "ghcr.io.evil.example",
        "127.0.0.1",  # IP literals only when listed
        "127.0.0.1:5001",
        "10.0.0.1",
        "169.254.169.254",
        "[::1]:5000",
        "user:pass@ghcr.io",
        "ghcr.io/../../admin",
        "ghcr.io?x=1",
        "ghcr.io#frag",
        "ghcr.io\r\nHost: evil",
        "gh cr.io",
        "ghcr.io:0",
        "ghcr.io:99999",
        "http://ghcr.io",
    ],
)
def test_everything_else_is_refused(ns: str | None) -> None:
    allow = AllowList(["docker.io", "ghcr.io", "127.0.0.1:5000"])
    assert allow.endpoint(ns) is None


def test_names_are_compared_normalised_and_bad_entries_ignored() -> None:
    allow = AllowList(["GHCR.io", "not a host", "bad/entry"])
    assert allow.endpoint("ghcr.io") is not None
    assert allow.registries == frozenset({"ghcr.io"})


def test_from_settings(tmp_path: Any) -> None:
    settings = Settings.defaults(
        mirror_registries=["quay.io", "127.0.0.1:5000"], upstream_insecure=["127.0.0.1:5000"]
    )
    src = UpstreamSource.from_settings(settings)
    assert src.name == "upstream"
    assert src.endpoint("quay.io") is not None
    assert src.endpoint("docker.io") is None
    endpoint = src.endpoint("127.0.0.1:5000")
    assert endpoint is not None and endpoint.base.scheme == "http"


async def test_not_allowed_registry_sees_no_request(servers: Servers) -> None:
    reg = await servers.registry()
    image = add_image(reg)
    async with source("docker.io") as src:  # the fake is not on the list
        assert await src.resolve(ref(reg)) is None
        assert src.last_known(ref(reg)) is None
        assert await src.lookup(ref(reg)) is None
        assert await src.find(ref(reg), image.digest, "manifest") is None
        assert await src.find(ref(reg), image.layer_digest, "blob") is None
    assert reg.seen == []
    # Control: the same calls with the registry allowed do reach it.
    async with source(reg) as src:
        assert await src.resolve(ref(reg)) is not None
    assert reg.seen


async def test_no_dns_lookup_for_names_not_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's default resolver calls socket.getaddrinfo; record every call."""
    lookups: list[str] = []

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "no DNS in tests")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    digest = Digest.of(b"x")
    hostile = [
        "evil.invalid",
        "evil.invalid:5000",
        "allowed.invalid:5000",
        "allowed.invalid.evil.invalid",
        "user@allowed.invalid",
        "allowed.invalid/x",
        "10.1.2.3",
    ]
    async with source("allowed.invalid") as src:
        for ns in hostile:
            r = Reference(ns, "team/app", tag="v1")
            assert await src.resolve(r) is None
            assert await src.lookup(r) is None
            assert await src.find(r, digest, "manifest") is None
            assert await src.find(r, digest, "blob") is None
        assert lookups == []
        # Control: an allowed name is looked up (and fails here), so the recording works.
        assert await src.resolve(Reference("allowed.invalid", "team/app", tag="v1")) is None
    assert lookups and set(lookups) == {"allowed.invalid"}


async def test_injected_resolver_is_used_and_not_consulted_for_refused_names(
    servers: Servers,
) -> None:
    reg = await servers.registry()
    add_image(reg)
    port = reg.host.rsplit(":", 1)[1]
    resolver = RecordingResolver({"registry.test": "127.0.0.1"})
    name = f"registry.test:{port}"
    async with source(name, resolver=resolver) as src:
        assert await src.resolve(ref(f"other.test:{port}")) is None
        assert resolver.lookups == []
        desc = await src.resolve(ref(name))
    assert desc is not None
    assert resolver.lookups == ["registry.test"]
    assert [s.path for s in reg.seen] == ["/v2/team/app/manifests/v1"]


@pytest.mark.parametrize(
    ("repository", "tag"),
    [("team/app", "../../../admin"), ("team/app", "v1?x=1"), ("../admin", "v1"), ("a//b", "v1")],
)
async def test_hand_made_references_cannot_leave_the_api_path(
    servers: Servers, repository: str, tag: str
) -> None:
    reg = await servers.registry()
    async with source(reg) as src:
        with pytest.raises(RegistryError):
            await src.lookup(Reference(reg.host, repository, tag=tag))
    assert reg.seen == []
