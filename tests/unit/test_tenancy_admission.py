"""Who may ask the pull API: this node's containerd over loopback, signed peers, and containerd
of another node carrying a capability; anyone else is refused before any lookup."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from shoal import metrics
from shoal.registry.protocol import FETCH_HEADER, P2P_INFO_PATH, PEER_HEADER, Asker
from shoal.tenancy.admission import Admission, admitted, is_local, parse_networks
from shoal.tenancy.keys import ClusterKey
from shoal.tenancy.signer import PeerSigner
from shoal.tenancy.tokens import AUTH_HEADER, CAP_QUERY

KEY = ClusterKey(b"the admission tests' cluster key, 32+ bytes")
PATH = "/v2/team/app/blobs/sha256:" + "c" * 64
NS = "registry.test:5000"
WORKLOAD = "10.0.0.9"


def request(
    path: str, remote: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (remote, 40000) if name == "peername" else default
    )
    return make_mocked_request(method, path, headers=headers or {}, transport=transport)


class Recorder:
    """The pull API behind admission: records who it was asked by (a lookup, had it run)."""

    def __init__(self) -> None:
        self.askers: list[Asker] = []

    async def __call__(self, req: web.Request) -> web.StreamResponse:
        self.askers.append(admitted(req))
        return web.Response(text="ok")


async def ask(admission: Admission, req: web.Request) -> tuple[int, dict, Recorder]:
    handler = Recorder()
    resp = await admission.middleware(req, handler)
    assert isinstance(resp, web.Response)
    body = json.loads(resp.body) if resp.status >= 400 and resp.body else {}  # type: ignore[arg-type]
    return resp.status, body, handler


def node(name: str = "node-1") -> Admission:
    return Admission(KEY, lambda: name)


@pytest.mark.parametrize("remote", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"])
async def test_loopback_is_this_nodes_containerd(remote: str) -> None:
    status, _, handler = await ask(node(), request(f"{PATH}?ns={NS}", remote))
    assert status == 200 and handler.askers == [Asker.CONTAINERD]


@pytest.mark.parametrize("path", [f"{PATH}?ns={NS}", "/v2/team/app/manifests/v1?ns=" + NS, "/v2/"])
async def test_anyone_else_without_proof_gets_401_and_causes_no_lookup(path: str) -> None:
    before = metrics.REFUSALS.labels("unauthenticated")._value.get()
    status, body, handler = await ask(node(), request(path, WORKLOAD))
    assert status == 401 and body["errors"][0]["code"] == "UNAUTHORIZED"
    assert handler.askers == []
    assert metrics.REFUSALS.labels("unauthenticated")._value.get() == before + 1


async def test_peer_marks_without_a_signature_are_refused_even_from_loopback() -> None:
    for headers in ({PEER_HEADER: "1"}, {FETCH_HEADER: "1"}):
        status, _, handler = await ask(node(), request(PATH, "127.0.0.1", headers))
        assert status == 401 and handler.askers == []
    status, _, handler = await ask(node(), request(f"{PATH}?shoal-fetch=1", "127.0.0.1"))
    assert status == 401 and handler.askers == []


async def test_signed_requests_are_peers_and_the_fetch_mark_is_theirs_to_sign() -> None:
    signer = PeerSigner(KEY, lambda: "node-2")
    for fetch, asker in ((False, Asker.PEER), (True, Asker.FETCH)):
        headers = signer.headers("HEAD", PATH, NS, fetch)
        status, _, handler = await ask(
            node(), request(f"{PATH}?ns={NS}", WORKLOAD, headers, "HEAD")
        )
        assert status == 200 and handler.askers == [asker]
    # The fetch mark added to a plain peer request breaks its signature.
    headers = {**signer.headers("GET", PATH, NS, False), FETCH_HEADER: "1"}
    status, body, handler = await ask(node(), request(f"{PATH}?ns={NS}", WORKLOAD, headers))
    assert status == 403 and body["errors"][0]["code"] == "DENIED" and handler.askers == []


async def test_a_bad_signature_is_refused_even_from_loopback() -> None:
    other = PeerSigner(ClusterKey(b"not this cluster's key but long enough"), lambda: "x")
    for headers in (other.headers("GET", PATH, NS, False), {AUTH_HEADER: "v1 x 1 nonsense"}):
        status, _, handler = await ask(node(), request(f"{PATH}?ns={NS}", "127.0.0.1", headers))
        assert status == 403 and handler.askers == []


async def test_a_capability_admits_the_redirected_containerd_of_another_node() -> None:
    query = PeerSigner(KEY, lambda: "node-2").redirect_query("node-1", PATH, NS, False)
    url = f"{PATH}?ns={NS}&{CAP_QUERY}={query[CAP_QUERY]}"
    status, _, handler = await ask(node("node-1"), request(url, WORKLOAD))
    assert status == 200 and handler.askers == [Asker.PEER]
    # At another holder, or for another blob, the same capability opens nothing.
    status, _, handler = await ask(node("node-3"), request(url, WORKLOAD))
    assert status == 403 and handler.askers == []
    other = url.replace("c" * 64, "d" * 64)
    status, _, handler = await ask(node("node-1"), request(other, WORKLOAD))
    assert status == 403 and handler.askers == []


async def test_a_fetch_capability_admits_a_fetch() -> None:
    query = PeerSigner(KEY, lambda: "node-2").redirect_query("node-1", PATH, NS, True)
    url = f"{PATH}?ns={NS}&shoal-fetch=1&{CAP_QUERY}={query[CAP_QUERY]}"
    status, _, handler = await ask(node("node-1"), request(url, WORKLOAD))
    assert status == 200 and handler.askers == [Asker.FETCH]
    stripped = url.replace("&shoal-fetch=1", "")
    status, _, _ = await ask(node("node-1"), request(stripped, WORKLOAD))
    assert status == 403


async def test_without_a_cluster_key_only_loopback_is_admitted() -> None:
    keyless = Admission(None, lambda: "node-1")
    headers = PeerSigner(KEY, lambda: "node-2").headers("GET", PATH, NS, False)
    status, _, handler = await ask(keyless, request(f"{PATH}?ns={NS}", WORKLOAD, headers))
    assert status == 403 and handler.askers == []
    status, _, handler = await ask(keyless, request(f"{PATH}?ns={NS}", "127.0.0.1"))
    assert status == 200


async def test_the_p2p_identity_stays_open() -> None:
    async def info(_: web.Request) -> web.StreamResponse:
        return web.json_response({"id": "node-1"})

    resp = await node().middleware(request(P2P_INFO_PATH, WORKLOAD), info)
    assert resp.status == 200


def test_local_addresses_extend_loopback_only_as_configured() -> None:
    nets = parse_networks(["10.1.2.3", "192.168.7.0/24"])
    assert is_local("10.1.2.3", nets) and is_local("192.168.7.200", nets)
    assert not is_local("10.1.2.4", nets) and not is_local("10.1.2.3")
    assert not is_local(None) and not is_local("not an address")
