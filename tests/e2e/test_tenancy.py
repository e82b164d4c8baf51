"""Private images stay private (issue 14), on real parts: three nodes, each a network namespace
with its own containerd and shoal, one namespace standing for a workload on the same bridge, an
htpasswd-protected docker-registry holding private images and a plain one holding a public image.

Node 3's shoal has upstream credentials for the private registry; nodes 1 and 2 have none.
The tests run in order: node 1 pulls the private image with `ctr --user`, then the workload
tries everything against every node, a credentialed shoal is asked to fetch for a peer, node 2
pulls without and with credentials, node 1 re-pulls with wrong ones, and the public image still
goes peer to peer with its registry stopped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.cluster import MIRROR, PORT, Cluster, Node, request_from, wait_until
from tests.harness.netns import Namespace, Network
from tests.harness.procs import stop_all
from tests.harness.registry import AccessRecord, Registry

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

USER, PASSWORD = "alice", "correct horse"
GOOD, WRONG = f"{USER}:{PASSWORD}", f"{USER}:battery staple"


@dataclass
class World:
    cluster: Cluster
    private: Registry
    public: Registry
    workload: Namespace
    secret: images.Image  # pulled by nodes 1 and 2
    unpulled: images.Image  # no node ever pulls it through the workload's or a peer's doing
    opened: images.Image  # public
    refs: dict[str, str]

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    def private_bytes(self) -> list[bytes]:
        """Distinctive bytes of every private object (whole manifests and configs, the start
        of each layer)."""
        blobs = [*self.secret.blobs.values(), *self.unpulled.blobs.values()]
        return [b.data[:4096] for b in blobs]


def docker_config(path: Path, host: str) -> str:
    auth = base64.b64encode(GOOD.encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("tenancy")
    net = Network("tenancy").create()
    try:
        reg_ns = net.add("reg")
        where = {"host_ip": reg_ns.ip, "netns": reg_ns.name}
        private = Registry(
            base / "private", auth="htpasswd", users={USER: PASSWORD}, name="private", **where
        ).start()
        public = Registry(base / "public", name="public", **where).start()
        # Layers of 3 MiB: large enough that containerd is redirected to the peer holding them.
        secret = images.large_image(6, layers=2, seed=41, name="secret")
        unpulled = images.oci_image("never-pulled")
        opened = images.large_image(6, layers=2, seed=42, name="open")
        refs = {
            "secret": images.push(secret, private, "secret/app", "v1", creds=GOOD),
            "unpulled": images.push(unpulled, private, "secret/other", "v1", creds=GOOD),
            "open": images.push(opened, public, "open/app", "v1"),
        }
        hosts = f"{private.host},{public.host}"
        cluster = Cluster(net, base, private, shoal_args=[
            "--mirror-registries", hosts, "--upstream-insecure", hosts,
            "--resync-interval", "5"])  # fmt: skip
        for i in range(3):
            node = cluster.add_node(f"t{i + 1}")
            node.containerd.write_hosts_toml(public.host, MIRROR, public.url)
        n1, n2, n3 = cluster.nodes
        cluster.start_shoal(n1)
        cluster.start_shoal(n2)
        cluster.start_shoal(n3, "--upstream-credentials", docker_config(base / "creds.json",
                                                                         private.host))  # fmt: skip
        cluster.wait_connected()
        workload = net.add("workload")
        yield World(cluster, private, public, workload, secret, unpulled, opened, refs)
    finally:
        stop_all()
        net.destroy()


def by_node(records: list[AccessRecord], node: Node) -> list[AccessRecord]:
    return [r for r in records if r.remote.rsplit(":", 1)[0] == node.ns.ip]


def test_node1_pulls_the_private_image_with_its_own_credentials(world: World) -> None:
    n1, n2, _ = world.nodes
    n1.containerd.pull(world.refs["secret"], user=GOOD)
    assert n1.containerd.images()[world.refs["secret"]] == world.secret.digest
    wait_until(lambda: n1.metric("shoal_images_by_status", status="private") >= 1, 30,
               "node 1 learned that the registry does not serve the image anonymously")  # fmt: skip
    n1.containerd.pull(world.refs["open"])  # public: through shoal, from upstream
    tag = f"{world.public.host}/open/app:v1"
    wait_until(lambda: n1.ns.ip in n2.providers(tag), 30, "node 1 advertised the public image")
    for key in (*world.secret.blobs, f"{world.private.host}/secret/app:v1"):
        assert n2.providers(key) == [], key  # nothing private is advertised


def test_the_workload_gets_no_private_bytes_and_causes_no_registry_request(world: World) -> None:
    paths: list[str] = []
    for image, repo, ns in (
        (world.secret, "secret/app", world.private.host),
        (world.unpulled, "secret/other", world.private.host),
        (world.opened, "open/app", world.public.host),
    ):
        manifests = f"/v2/{repo}/manifests"
        paths += [f"{manifests}/v1?ns={ns}", f"{manifests}/{image.digest}?ns={ns}",
                  f"{manifests}/{image.digest}",
                  f"/v2/unrelated/name/manifests/{image.digest}?ns={ns}"]  # fmt: skip
        for digest in image.blobs:
            paths += [f"/v2/{repo}/blobs/{digest}?ns={ns}", f"/v2/{repo}/blobs/{digest}",
                      f"/v2/unrelated/name/blobs/{digest}?ns={ns}"]  # fmt: skip
    layer = world.secret.layers[0].digest
    forged = [  # peer marks, a made-up signature, a made-up capability
        ({"X-Shoal-Peer": "1"}, ""), ({"X-Shoal-Peer": "1", "X-Shoal-Fetch": "1"}, ""),
        ({"X-Shoal-Auth": "v1 12D3KooWfake 1800000000 bm9wZQ"}, ""),
        ({}, "&shoal-cap=1900000000.bm9wZQ"), ({}, "&shoal-fetch=1"),
    ]  # fmt: skip
    marks = {reg.name: reg.mark() for reg in (world.private, world.public)}
    private = world.private_bytes()
    refusals_before = sum(n.metric("shoal_refusals_total") for n in world.nodes)
    asked = 0
    for node in world.nodes:
        base = f"http://{node.ns.ip}:{PORT}"
        attempts = [(p, "GET", {}) for p in paths] + [(p, "HEAD", {}) for p in paths]
        attempts += [(f"/v2/secret/app/blobs/{layer}?ns={world.private.host}{q}", "GET", h)
                     for h, q in forged]  # fmt: skip
        attempts += [("/v2/", "GET", {})]
        for path, method, headers in attempts:
            status, got_headers, body = request_from(world.workload, base + path, method, headers)
            asked += 1
            assert status in (401, 403), (node.ns.short_name, method, path, headers, status)
            assert "Docker-Content-Digest" not in got_headers
            if method == "GET":
                code = json.loads(body)["errors"][0]["code"]
                assert code == ("UNAUTHORIZED" if status == 401 else "DENIED")
            assert not any(piece in body for piece in private)
        # The libp2p identity is public (useless without the cluster key); lookups are not.
        status, _, body = request_from(world.workload, f"{base}/_shoal/p2p")
        assert status == 200 and set(json.loads(body)) == {"id", "addrs"}
        status, _, _ = request_from(
            world.workload, f"http://{node.ns.ip}:30021/debug/providers?key={layer}"
        )
        assert status == 403
    for reg in (world.private, world.public):
        reg.settle()
        assert reg.access_log(since=marks[reg.name]) == [], reg.name
    refused = sum(n.metric("shoal_refusals_total") for n in world.nodes) - refusals_before
    assert refused >= asked
    assert all(n.metric("shoal_refusals_total", reason="unauthenticated") > 0 for n in world.nodes)


def test_credentials_fetch_nothing_on_behalf_of_a_peer(world: World) -> None:
    """Node 3 has credentials. Asked, as the cluster's designated fetcher, for a private image
    no node holds, it goes to the registry anonymously and answers 404; for its own
    containerd it uses them (a node-wide credential, as configured)."""
    from shoal.tenancy.keys import ClusterKey
    from shoal.tenancy.signer import PeerSigner

    n3 = world.nodes[2]
    signer = PeerSigner(ClusterKey.from_file(world.cluster.key_file), lambda: "a-member")
    mark = world.private.mark()
    ns = world.private.host
    for digest in world.unpulled.blobs:
        for kind in ("manifests", "blobs"):
            path = f"/v2/secret/other/{kind}/{digest}"
            headers = signer.headers("GET", path, ns, True)
            url = f"http://{n3.ns.ip}:{PORT}{path}?ns={ns}"
            status, _, body = request_from(world.workload, url, "GET", headers)
            assert status == 404, (path, status)
            assert not any(piece in body for piece in world.private_bytes())
    records = world.private.settle()[mark:]
    assert records and all(r.status == 401 for r in records), records  # anonymous, refused
    n3.containerd.pull(world.refs["unpulled"])  # no --user: node 3's shoal answers with its own
    assert n3.containerd.images()[world.refs["unpulled"]] == world.unpulled.digest
    assert any(r.status == 200 for r in by_node(world.private.access_log(mark), n3))


def test_node2_without_credentials_is_refused_by_the_registry(world: World) -> None:
    n1, n2, n3 = world.nodes
    sent = [n.metric("shoal_bytes_to_peers_total") for n in (n1, n3)]
    mark = world.private.mark()
    proc = n2.containerd.pull(world.refs["secret"], check=False)
    assert proc.returncode != 0
    refused = [r for r in by_node(world.private.settle()[mark:], n2) if "/manifests/" in r.path]
    assert refused and {r.status for r in refused} == {401}  # the registry decided
    assert [n.metric("shoal_bytes_to_peers_total") for n in (n1, n3)] == sent
    assert not any(n2.containerd.has_blob(d) for d in world.secret.blobs)
    # With credentials, containerd gets it from the registry.
    n2.containerd.pull(world.refs["secret"], user=GOOD)
    assert n2.containerd.images()[world.refs["secret"]] == world.secret.digest
    for digest in world.secret.blobs:
        assert n2.containerd.read_blob(digest) == world.secret.blobs[digest].data


def test_node1_repull_with_wrong_credentials_fails(world: World) -> None:
    n1 = world.nodes[0]
    assert world.refs["secret"] in n1.containerd.images()  # it holds the image
    mark = world.private.mark()
    proc = n1.containerd.pull(world.refs["secret"], user=WRONG, check=False)
    assert proc.returncode != 0
    records = by_node(world.private.settle()[mark:], n1)
    assert records and all(r.status == 401 for r in records)


def test_public_images_still_go_peer_to_peer(world: World) -> None:
    n1, n2, _ = world.nodes
    world.public.stop()
    try:
        n2.containerd.pull(world.refs["open"])  # only the cluster can serve it now
        for digest in world.opened.blobs:
            assert n2.containerd.read_blob(digest) == n1.containerd.read_blob(digest)
    finally:
        world.public.start()


def test_a_capability_opens_one_object_at_one_holder(world: World) -> None:
    """What a node puts in the redirect it gives its containerd: a bearer capability for that
    blob at that holder. It opens nothing else there, and nothing at another node."""
    from shoal.tenancy.keys import ClusterKey
    from shoal.tenancy.signer import PeerSigner

    n1, n2, _ = world.nodes
    signer = PeerSigner(ClusterKey.from_file(world.cluster.key_file), lambda: "a-member")
    layer, secret = world.opened.layers[0], world.secret.layers[0]
    ns = world.public.host

    def url(node: Node, repo: str, digest: str) -> str:
        path = f"/v2/{repo}/blobs/{digest}"
        cap = signer.redirect_query(n1.peer_id(), f"/v2/open/app/blobs/{layer.digest}", ns, False)
        return f"http://{node.ns.ip}:{PORT}{path}?ns={ns}&shoal-cap={cap['shoal-cap']}"

    status, _, body = request_from(world.workload, url(n1, "open/app", layer.digest))
    assert status == 200 and body == layer.data
    for other in (url(n1, "secret/app", secret.digest), url(n1, "open/app", secret.digest),
                  url(n2, "open/app", layer.digest)):  # fmt: skip
        status, _, body = request_from(world.workload, other)
        assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
