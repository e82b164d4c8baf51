"""The harness itself, checked against the real components."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import images, procs
from tests.harness.containerd import ContainerdNode
from tests.harness.netns import Network, cleanup_leftovers
from tests.harness.registry import Registry, http_request
from tests.harness.upstream import Upstream

from .conftest import NodeFactory, node_pool, require_containerd


def _gone(pid: int) -> bool:
    return not procs.pid_alive(pid)


def test_images_are_deterministic() -> None:
    assert images.oci_image("x").digest == images.oci_image("x").digest
    assert images.multiarch_index().digest == images.multiarch_index().digest
    a, b = images.large_image(1, layers=2, seed=7), images.large_image(1, layers=2, seed=7)
    assert a.digest == b.digest
    assert images.large_image(1, layers=2, seed=8).digest != a.digest
    oci = images.oci_image()
    assert len(oci.layers) >= 3
    assert oci.media_type == images.OCI_MANIFEST
    docker = images.docker_schema2_image()
    assert docker.media_type == images.DOCKER_MANIFEST
    assert docker.config.media_type == images.DOCKER_CONFIG
    assert {layer.media_type for layer in docker.layers} == {images.DOCKER_LAYER}
    multi = images.multiarch_index()
    assert {m.platform["architecture"] for m in multi.manifests} == {"amd64", "arm64"}


def test_pushed_digests_match_built(registry: Upstream) -> None:
    for key, image in registry.images.items():
        assert registry.registry.manifest_digest(registry.repos[key], "v1") == image.digest
    multi = registry.images["multi"]
    assert isinstance(multi, images.Index)
    for m in multi.manifests:  # the per-platform manifests went up unchanged too
        assert registry.registry.manifest_digest(registry.repos["multi"], m.digest) == m.digest


@pytest.mark.parametrize("key", ["oci", "multi", "docker"])
def test_node_pulls_straight_from_registry(
    registry: Upstream, node_factory: NodeFactory, key: str
) -> None:
    node = node_factory("n1")
    mark = registry.registry.mark()
    node.pull(registry.ref(key), via_hosts=False, plain_http=True)

    image = registry.images[key]
    assert node.images()[registry.ref(key)] == image.digest
    platform_image = image.for_platform()  # only the node's platform is fetched
    expected = {image.digest, *platform_image.blobs}
    assert expected <= node.content_digests()
    for digest in expected:
        assert node.read_blob(digest) == image.blobs[digest].data

    records = registry.registry.settle()[mark:]
    repo = registry.repos[key]
    got = {(r.method, r.path) for r in records if r.status == 200}
    assert ("HEAD", f"/v2/{repo}/manifests/v1") in got
    for blob in (platform_image.config, *platform_image.layers):
        assert ("GET", f"/v2/{repo}/blobs/{blob.digest}") in got
    assert all(r.status == 200 for r in records)
    assert registry.registry.bytes_sent(mark, blobs_only=True) == sum(
        b.size for b in (platform_image.config, *platform_image.layers)
    )


def test_pull_through_hosts_toml_mirror(
    registry: Upstream, node_factory: NodeFactory, tmp: Path
) -> None:
    """hosts.toml points the upstream's host at a pull-through mirror: every request goes to
    the mirror first, with `ns=<upstream host>` (containerd adds it for a different host)."""
    mirror = Registry(tmp / "mirror", proxy_remoteurl=registry.url, name="mirror").start()
    node = node_factory("n1")
    node.write_hosts_toml(registry.host, mirror.url)
    node.pull(registry.ref("oci"))  # via_hosts=True: what CRI does
    assert node.images()[registry.ref("oci")] == registry.digest("oci")
    records = mirror.settle()
    assert records and all(r.query == f"ns={registry.host.replace(':', '%3A')}" for r in records)
    assert ("HEAD", "/v2/test/oci/manifests/v1", 200) in mirror.requests()

    # A removed image comes back from the mirror's cache: nothing new reaches the upstream.
    node.remove_image(registry.ref("oci"))
    assert registry.digest("oci") not in node.content_digests()
    mark = registry.registry.mark()
    node.pull(registry.ref("oci"))
    blobs = [r for r in registry.registry.settle()[mark:] if "/blobs/" in r.path]
    assert blobs == []
    mirror.stop()


def test_registry_log_sees_no_requests_when_idle(registry: Upstream) -> None:
    mark = registry.registry.mark()
    time.sleep(0.2)
    assert registry.registry.requests(mark) == []
    status, _, _ = http_request(f"{registry.url}/v2/")
    assert status == 200
    assert registry.registry.wait_requests(1, mark)[0][:3] == ("GET", "/v2/", 200)


def test_silly_auth_issues_bearer_challenges(
    registry: Upstream, node_factory: NodeFactory, tmp: Path
) -> None:
    authed = registry.serve_on(tmp / "authed", "127.0.0.1", auth="silly")
    status, headers, _ = http_request(f"{authed.url}/v2/test/oci/manifests/v1", method="HEAD")
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer realm=")
    node = node_factory("n1")
    node.pull(authed.ref("oci"), via_hosts=False)
    assert node.images()[authed.ref("oci")] == registry.digest("oci")
    assert authed.registry.token_server is not None
    assert authed.registry.token_server.requests()  # containerd fetched a token
    authed.registry.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mib", [64, 128])
def test_large_image_push_and_pull(registry: Upstream, node_factory: NodeFactory, mib: int) -> None:
    big = images.large_image(mib, layers=4, seed=1)
    assert sum(b.size for b in big.layers) >= mib * 1024 * 1024
    ref = registry.add(f"large{mib}", big)
    node = node_factory("n1")
    node.pull(ref, via_hosts=False)
    assert node.images()[ref] == big.digest
    assert node.read_blob(big.layers[-1].digest) == big.layers[-1].data


# --- process hygiene ---------------------------------------------------------------------


def test_node_pool_stops_every_node_it_made(registry: Upstream, tmp: Path) -> None:
    with node_pool(tmp) as make:
        node, other = make("a"), make("b")
        assert node.proc is not None and other.proc is not None
        started = {node.proc.pid, other.proc.pid}
        assert {p.pid for p in procs.running()} >= started
    assert all(_gone(pid) for pid in started)
    assert not {p.pid for p in procs.running()} & started


def test_stop_escalates_to_sigkill(tmp: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    proc = procs.start([sys.executable, "-c", code], name="stubborn", log_path=tmp / "s.log")
    procs.wait_for(lambda: "up" in proc.log_text(), timeout=10, what="stub", proc=proc)
    t0 = time.monotonic()
    rc = proc.stop(timeout=0.5)
    assert rc == -9 and time.monotonic() - t0 < 5
    assert _gone(proc.pid) and proc not in procs.running()


def test_wait_for_reports_early_exit(tmp: Path) -> None:
    proc = procs.start(
        [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
        name="crasher",
        log_path=tmp / "c.log",
    )
    with pytest.raises(procs.HarnessError, match=r"exited with 3(.|\n)*boom"):
        procs.wait_for(lambda: False, timeout=10, what="never", proc=proc)
    proc.stop()


def test_containerd_stop_and_restart(node_factory: NodeFactory, registry: Upstream) -> None:
    node = node_factory("n1")
    node.pull(registry.ref("oci"), via_hosts=False)
    assert node.proc is not None
    pid = node.proc.pid
    node.restart()
    assert _gone(pid)
    assert node.images()[registry.ref("oci")] == registry.digest("oci")  # state persists


def test_long_base_dir_gets_short_socket(tmp: Path) -> None:
    require_containerd()
    deep = tmp / ("d" * 60) / ("e" * 60)
    with ContainerdNode("deep", deep) as node:
        assert len(str(node.socket)) < 100
        assert node.ctr("version").returncode == 0
    assert not node.socket.parent.exists()


# --- network namespaces ------------------------------------------------------------------


def _serve_bytes(sock: socket.socket, size: int) -> threading.Thread:
    def run() -> None:
        conn, _ = sock.accept()
        with conn:
            chunk = b"\0" * 65536
            left = size
            while left > 0:
                left -= conn.send(chunk[: min(left, len(chunk))])
        sock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _transfer_rate(sender, receiver, size: int) -> float:  # type: ignore[no-untyped-def]
    """Bytes/s of a TCP transfer from namespace `sender` to namespace `receiver`."""
    srv = sender.socket()
    srv.bind((sender.ip, 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    thread = _serve_bytes(srv, size)
    cli = receiver.socket()
    cli.settimeout(30)
    t0 = time.monotonic()
    cli.connect((sender.ip, port))
    got = 0
    with cli:
        while got < size:
            data = cli.recv(1 << 20)
            if not data:
                break
            got += len(data)
    elapsed = time.monotonic() - t0
    thread.join(5)
    assert got == size
    return size / elapsed


@pytest.mark.netns
def test_namespaces_reach_each_other_and_nothing_else(network: Network) -> None:
    a, b = network.add("a"), network.add("b")
    assert a.ip != b.ip and network.host_ip not in (a.ip, b.ip)
    # TCP both ways, and from the root namespace through the bridge address.
    for src, dst in ((a, b), (b, a)):
        srv = dst.socket()
        srv.bind((dst.ip, 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert procs.tcp_open(dst.ip, port, netns=src.name)
        srv.close()
    root_srv = socket.socket()
    root_srv.bind((network.host_ip, 0))
    root_srv.listen(1)
    assert procs.tcp_open(network.host_ip, root_srv.getsockname()[1], netns=a.name)
    root_srv.close()
    routes = a.exec(["ip", "-4", "route"]).stdout
    assert "default" not in routes
    assert str(network.subnet) in routes
    # Loopback is up inside.
    assert "UP" in a.exec(["ip", "-br", "link", "show", "lo"]).stdout.upper()


@pytest.mark.netns
def test_tbf_limit_applies(network: Network) -> None:
    a, b = network.add("a"), network.add("b")
    size = 6 * 1024 * 1024
    unlimited = _transfer_rate(a, b, size)
    a.limit("40mbit")
    limited = _transfer_rate(a, b, size)
    expected = 40e6 / 8
    assert unlimited > 4 * expected, f"unlimited only {unlimited / 1e6:.1f} MB/s"
    assert 0.6 * expected < limited < 1.2 * expected, f"limited {limited / 1e6:.2f} MB/s"
    a.unlimit()
    assert _transfer_rate(a, b, size) > 2 * expected


@pytest.mark.netns
def test_node_in_namespace_pulls_from_bridge_registry(
    network: Network, network_registry: Upstream, node_factory: NodeFactory
) -> None:
    """containerd inside a namespace; the registry listens on the bridge address, which is
    not loopback, so ctr needs --plain-http (or a hosts.toml with an http:// server)."""
    ns = network.add("n1")
    node = node_factory("n1", netns=ns)
    ref = network_registry.ref("multi")
    failed = node.pull(ref, via_hosts=False, check=False)
    assert failed.returncode != 0 and "https" in failed.stderr.lower()
    node.pull(ref, via_hosts=False, plain_http=True)
    assert node.images()[ref] == network_registry.digest("multi")

    node.remove_image(ref)
    node.write_hosts_toml(network_registry.host, None, server_url=network_registry.url)
    mark = network_registry.registry.mark()
    node.pull(ref)  # hosts.toml decides the scheme, no --plain-http needed
    assert node.images()[ref] == network_registry.digest("multi")
    remotes = {r.remote for r in network_registry.registry.settle()[mark:]}
    assert remotes == {ns.ip}


@pytest.mark.netns
def test_removed_namespace_gives_back_its_name_and_address(network: Network) -> None:
    a, b = network.add("a"), network.add("b")
    old_ip, old_veth = a.ip, a.veth_host
    network.remove("a")
    assert not Path("/run/netns", a.name).exists()
    assert not Path("/sys/class/net", old_veth).exists()
    again = network.add("a")  # a bench makes and removes hundreds of nodes in one /24
    assert again.ip == old_ip
    assert again.veth_host not in (old_veth, b.veth_host)
    srv = b.socket()
    srv.bind((b.ip, 0))
    srv.listen(1)
    assert procs.tcp_open(b.ip, srv.getsockname()[1], netns=again.name)
    srv.close()


@pytest.mark.netns
def test_port_80_registry_is_named_without_port(
    network: Network, node_factory: NodeFactory, tmp: Path
) -> None:
    """References name real registries without a port, and containerd's distribution-source
    labels drop it anyway (Spegel matches content to registries by those labels)."""
    ns = network.add("reg")
    reg = Registry(tmp / "reg80", host_ip=ns.ip, port=80, netns=ns.name).start()
    assert (reg.host, reg.addr, reg.url) == (ns.ip, f"{ns.ip}:80", f"http://{ns.ip}")
    image = images.oci_image("port80")
    ref = images.push(image, reg, "p/eighty", "v1")
    assert ref == f"{ns.ip}/p/eighty:v1"
    node = node_factory("n", netns=network.add("n"))
    node.pull(ref, via_hosts=False, plain_http=True)
    assert node.images()[ref] == image.digest
    labels = node.ctr("content", "ls").stdout
    assert f"containerd.io/distribution.source.{ns.ip}=p/eighty" in labels
    reg.stop()


@pytest.mark.netns
def test_network_teardown_removes_everything(tmp: Path, node_factory: NodeFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    net = Network("gone").create()
    ns = net.add("x")
    node = node_factory("x", netns=ns)
    assert node.proc is not None
    pid = node.proc.pid
    net.destroy()  # stops the node's containerd first
    assert _gone(pid)
    assert not Path("/run/netns", ns.name).exists()
    assert not Path("/sys/class/net", net.bridge).exists()
    assert not Path("/sys/class/net", ns.veth_host).exists()


def test_components_die_with_a_killed_test_process(tmp: Path) -> None:
    """PDEATHSIG: when the process that started a component is SIGKILLed (a crashed or
    killed pytest), the component does not linger."""
    code = (
        "import sys; from pathlib import Path; from tests.harness import procs\n"
        "argv = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
        f"p = procs.start(argv, name='orphan', log_path=Path({str(tmp)!r}) / 'o.log')\n"
        "print(p.pid, flush=True); sys.stdin.read()"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # setpriv arms PDEATHSIG after Popen returns; wait until it exec'ed the payload.
        procs.wait_for(
            lambda: Path(f"/proc/{child}/comm").read_text().strip() != "setpriv",
            timeout=10,
            what="orphan to exec",
        )
    finally:
        parent.kill()
        parent.wait()
    procs.wait_for(lambda: _gone(child), timeout=5, what="orphan to die")


@pytest.mark.netns
def test_cleanup_leftovers_only_touches_dead_runs(network: Network) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_ns = f"shoal-{dead.pid}-dead-x"
    stale_link = "shoal-dead-br"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "link", "add", stale_link, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", stale_link, "alias", f"shoal pid={dead.pid}"], check=True)
    live = network.add("live")
    removed = cleanup_leftovers()
    assert stale_ns in removed and stale_link in removed
    assert not Path("/run/netns", stale_ns).exists()
    assert not Path("/sys/class/net", stale_link).exists()
    # This run's network is left alone.
    assert Path("/run/netns", live.name).exists()
    assert Path("/sys/class/net", network.bridge).exists()
