"""The pull API with tenancy wired as the daemon wires it (`gated_chain`): what this node's
containerd, a peer and a designated-fetch request are answered, and where credentials go."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from shoal import metrics
from shoal.content.model import Blob, ContentKind, Descriptor, SourceKind
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.names import Reference, make_reference
from shoal.registry.app import make_app
from shoal.registry.transfer import PeerTransfer
from shoal.routing import Peer
from shoal.sources.download import Deadlines
from shoal.sources.local import LocalSource
from shoal.sources.peers import PeerSettings, PeerSource
from shoal.sources.tags import TagPolicy
from shoal.tenancy.access import Access, HeldImage
from shoal.tenancy.admission import Admission
from shoal.tenancy.credentialed import CredentialedUpstream
from shoal.tenancy.gate import AnonymousUpstream, Withheld, gated_chain
from shoal.tenancy.keys import ClusterKey
from shoal.tenancy.policy import SharePolicy
from shoal.tenancy.refusals import Refusals
from shoal.tenancy.signer import PeerSigner
from shoal.tenancy.status import Status, StatusStore
from shoal.upstream import UpstreamSource
from tests.fakes.images import LAYER, NS, build_image
from tests.fakes.registries import FakeRegistry, Servers
from tests.fakes.router import MemoryNetwork, MemoryRouter
from tests.fakes.store import MemoryStore
from tests.fakes.upstream import Clock, add_image, source, write_config

KEY = ClusterKey(b"the serving tests' cluster key, long enough")
SECRET = bytes(range(255, -1, -1)) * 4096  # the private image's layer


class Nothing:
    name = SourceKind.INFLIGHT

    async def resolve(self, ref: Reference) -> Descriptor | None:
        return None

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        return None


def private_image(store: MemoryStore) -> dict[str, Digest]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "secret": 1}).encode()
    cdig, ldig = store.add(config), store.add(SECRET)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": "c", "digest": str(cdig), "size": len(config)},
            "layers": [{"mediaType": "l", "digest": str(ldig), "size": len(SECRET)}],
        }
    ).encode()
    desc = store.tag(f"{NS}/secret/app:v1", mt.OCI_MANIFEST, manifest)
    return {"mdig": desc.digest, "cdig": cdig, "ldig": ldig}


def held(repo: str, parts: dict) -> HeldImage:
    digests = frozenset(str(parts[k]) for k in ("mdig", "cdig", "ldig"))
    mdig = str(parts["mdig"])
    return HeldImage(NS, repo, f"{NS}/{repo}:v1", mdig, digests, frozenset({mdig}), True)


class Node:
    def __init__(self, name: str, net: MemoryNetwork, tmp: Path) -> None:
        self.name = name
        self.net = net
        self.store = MemoryStore()
        self.access = Access(StatusStore(tmp / f"{name}.json"), SharePolicy(), None)
        self.signer = PeerSigner(KEY, lambda: name)
        self.server: TestServer | None = None
        self.peers: PeerSource | None = None

    async def start(
        self,
        fetch_for_peers: AnonymousUpstream | None = None,
        private: CredentialedUpstream | None = None,
        tags: TagPolicy | None = None,
    ) -> Node:
        router = MemoryRouter(self.net, Peer(self.name, "127.0.0.1:0"))
        settings = PeerSettings(deadlines=Deadlines(header_timeout=2.0))
        self.peers = PeerSource(router, settings, signer=self.signer)
        chain = gated_chain(
            local=LocalSource(self.store),
            inflight=Nothing(),
            peers=self.peers,
            fetch_for_containerd=fetch_for_peers or Nothing(),
            fetch_for_peers=fetch_for_peers or Nothing(),
            access=self.access,
            refused=Refusals(),
            tags=tags,
            private=private,
            denied=None if fetch_for_peers is None else fetch_for_peers.denied,
        )
        admission = Admission(KEY, lambda: self.name)
        app = make_app(chain, transfer=PeerTransfer(redirect=False), admission=admission)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        router.peer = Peer(self.name, f"127.0.0.1:{self.server.port}")
        await router.start()
        self.router = router
        return self

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    async def close(self) -> None:
        if self.peers is not None:
            await self.peers.close()
        if self.server is not None:
            await self.server.close()


async def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, headers=headers or {}, allow_redirects=False) as resp,
    ):
        return resp.status, await resp.read()


async def test_peers_get_public_content_and_nothing_private(tmp_path: Path) -> None:
    net = MemoryNetwork()
    a, b = Node("a", net, tmp_path), Node("b", net, tmp_path)
    public, secret = build_image(a.store), private_image(a.store)
    a.access.statuses.put((NS, "team/app", str(public["mdig"])), Status.PUBLIC, "probe")
    a.access.statuses.put((NS, "secret/app", str(secret["mdig"])), Status.PRIVATE, "probe")
    keys = a.access.update([held("team/app", public), held("secret/app", secret)])
    try:
        await a.start()
        await b.start()
        await a.router.advertise(keys)
        # A careless router advertising everything must not matter: the holder decides.
        await a.router.advertise([str(v) for v in secret.values()] + [f"{NS}/secret/app:v1"])
        status, body = await get(b.url(f"/v2/team/app/blobs/{public['ldig']}?ns={NS}"))
        assert status == 200 and body == LAYER
        status, body = await get(b.url(f"/v2/team/app/manifests/v1?ns={NS}"))
        assert status == 200 and body == public["manifest"]
        before = metrics.REFUSALS.labels("private")._value.get()
        for path in (
            "/v2/secret/app/manifests/v1",
            f"/v2/secret/app/manifests/{secret['mdig']}",
            f"/v2/team/app/manifests/{secret['mdig']}",  # under another repository
            f"/v2/secret/app/blobs/{secret['ldig']}",
            f"/v2/secret/app/blobs/{secret['cdig']}",
        ):
            status, body = await get(b.url(f"{path}?ns={NS}"))
            assert status == 404, path
            assert SECRET not in body and b"secret" not in body
        assert metrics.REFUSALS.labels("private")._value.get() > before
        # Node a's own containerd gets its blobs, but no private manifest or tag: it asks the
        # registry itself, with the pod's credentials.
        status, body = await get(a.url(f"/v2/secret/app/blobs/{secret['ldig']}?ns={NS}"))
        assert status == 200 and body == SECRET
        for ref in ("v1", str(secret["mdig"])):
            status, _ = await get(a.url(f"/v2/secret/app/manifests/{ref}?ns={NS}"))
            assert status == 404
        status, _ = await get(a.url(f"/v2/team/app/manifests/{public['mdig']}?ns={NS}"))
        assert status == 200
        # What a tag means is not told either (no step of any request learns the digest).
        for to_peers in (True, False):
            gate = Withheld(LocalSource(a.store), a.access, Refusals(), to_peers=to_peers)
            assert await gate.resolve(make_reference(NS, "secret/app", "v1")) is None
            assert await gate.resolve(make_reference(NS, "team/app", "v1")) is not None
    finally:
        await a.close()
        await b.close()


async def test_credentials_serve_this_nodes_containerd_only(
    tmp_path: Path, servers: Servers
) -> None:
    registry: FakeRegistry = await servers.registry(auth="basic", users={"alice": "pw"})
    image = add_image(registry)  # private, and no node holds it
    creds = write_config(tmp_path / "config.json", {registry.host: {"username": "alice",
                                                                    "password": "pw"}})  # fmt: skip
    net = MemoryNetwork()
    a, b = Node("a", net, tmp_path), Node("b", net, tmp_path)
    anonymous: UpstreamSource = source(registry)
    credentialed = CredentialedUpstream(source(registry, credentials=creds))
    try:
        await a.start(AnonymousUpstream(anonymous, a.access), credentialed)
        await b.start()
        path = f"/v2/team/app/manifests/{image.digest}?ns={registry.host}"
        blob = f"/v2/team/app/blobs/{image.layer_digest}?ns={registry.host}"
        # Node b asks node a to fetch it for the cluster: a goes anonymously, and is refused.
        for what in (path, blob):
            plain = what.split("?")[0]
            signed = b.signer.headers("GET", plain, registry.host, True)
            status, body = await get(a.url(what), signed)
            assert status == 404 and image.layer not in body
        assert registry.seen and all(s.authorization is None for s in registry.seen)
        # Node a's own containerd: fetched with a's credentials, after the anonymous attempt.
        status, body = await get(a.url(path))
        assert status == 200 and body == image.manifest
        status, body = await get(a.url(blob))
        assert status == 200 and body == image.layer
        assert any(s.authorization for s in registry.seen)
        # What credentials fetched taught nothing: it is not shareable.
        assert not a.access.blob_ok(image.layer_digest)
    finally:
        await a.close()
        await b.close()
        await anonymous.close()
        await credentialed.close()


async def test_a_repository_refused_to_anonymous_clients_is_not_asked_again_at_once(
    tmp_path: Path, servers: Servers
) -> None:
    """After the registry refused to tell a tag anonymously, the image's blobs cost no
    anonymous attempt each: the cluster's fetch steps aside for a while."""
    registry: FakeRegistry = await servers.registry(auth="basic", users={"alice": "pw"})
    image = add_image(registry)
    creds = write_config(tmp_path / "config.json", {registry.host: {"username": "alice",
                                                                    "password": "pw"}})  # fmt: skip
    node = Node("a", MemoryNetwork(), tmp_path)
    clock = Clock()
    anonymous = AnonymousUpstream(source(registry), node.access, clock)
    credentialed = CredentialedUpstream(source(registry, credentials=creds))
    try:
        await node.start(anonymous, credentialed, tags=TagPolicy("upstream-first", anonymous))
        status, body = await get(node.url(f"/v2/team/app/manifests/v1?ns={registry.host}"))
        assert status == 200 and body == image.manifest
        blob = f"/v2/team/app/blobs/{image.layer_digest}?ns={registry.host}"
        status, body = await get(node.url(blob))
        assert status == 200 and body == image.layer
        anonymous_blobs = [s for s in registry.seen if "/blobs/" in s.path and not s.authorization]
        assert anonymous_blobs == []
        clock.now += 61  # then it asks again, in case the repository turned public
        ref = make_reference(registry.host, "team/app", str(image.layer_digest))
        assert await anonymous.find(ref, image.layer_digest, "blob") is None
        assert [s for s in registry.seen if "/blobs/" in s.path and not s.authorization]
    finally:
        await node.close()
        await anonymous.upstream.close()
        await credentialed.close()
