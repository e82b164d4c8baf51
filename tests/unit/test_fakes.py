"""The fakes themselves: a broken fake must not make the tests that use it pass vacuously."""

from __future__ import annotations

import aiohttp
import pytest

from tests.fakes.registries import Servers
from tests.fakes.upstream import add_image


async def test_fake_registry_challenges_and_accepts_only_its_tokens(servers: Servers) -> None:
    tokens = await servers.tokens()
    reg = await servers.registry(auth="bearer", token_server=tokens, service="a")
    add_image(reg)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{reg.url}/v2/team/app/manifests/v1") as resp:
            assert resp.status == 401
            assert "Bearer realm=" in resp.headers["WWW-Authenticate"]
        async with http.get(tokens.realm, params={"service": "b"}) as resp:
            other = (await resp.json())["token"]
        async with http.get(tokens.realm, params={"service": "a"}) as resp:
            mine = (await resp.json())["token"]
        hdr = {"Authorization": f"Bearer {other}"}
        async with http.get(f"{reg.url}/v2/team/app/manifests/v1", headers=hdr) as resp:
            assert resp.status == 401
        hdr = {"Authorization": f"Bearer {mine}"}
        async with http.get(f"{reg.url}/v2/team/app/manifests/v1", headers=hdr) as resp:
            assert resp.status == 200


async def test_fake_registry_ranges_and_cuts(servers: Servers) -> None:
    reg = await servers.registry(cuts=[1000])
    image = add_image(reg)
    url = f"{reg.url}/v2/team/app/blobs/{image.layer_digest}"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(url) as resp:
                await resp.read()
        async with http.get(url, headers={"Range": "bytes=10-"}) as resp:
            assert resp.status == 206
            assert await resp.read() == image.layer[10:]
