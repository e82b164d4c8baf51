"""Where containerd versions differ, run on the run's version (SHOAL_CONTAINERD).

- 1.7.24 and 2.1.9 create the content directory only at their first write (1.6.20 and 2.3.7 at
  boot): a shoal started before that write must still read blobs from disk once it exists.
- CRI PullImage (the kubelet's pull) through shoal: 2.1+ pull through the transfer service by
  default, `use_local_image_pull = true` brings back the client-side pull 1.x always does.
- 2.1+ publish /content/create: a layer is advertised when containerd commits it, while the
  pull that fetches it is still going on (1.x: when the image exists, or at the next resync).
- A `:`-separated `config_path` (EKS ships one): `shoal configure` writes the first directory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.cluster import Cluster
from tests.harness.containerd import ContainerdNode, hosts_toml
from tests.harness.cri import cri_pull
from tests.harness.netns import Network
from tests.harness.registry import Registry
from tests.harness.runtime import selected
from tests.harness.shoal import ShoalDaemon
from tests.harness.upstream import Upstream

from .conftest import NodeFactory

pytestmark = pytest.mark.e2e

PULL_MODES = ["transfer-service", "local-pull"]


def shoal_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "shoal.cli", *args], check=True, timeout=30)


def local_blobs_served(shoal: ShoalDaemon) -> float:
    return shoal.metric("shoal_requests_total", source="local", kind="blob")


def cri_mode(pull: str) -> bool:
    """`use_local_image_pull` for this test's pull mode; skips what the version cannot do."""
    rt = selected()
    if not rt.cri_transfer_service:
        if pull == "transfer-service":
            pytest.skip(f"containerd {rt.version}'s CRI has no transfer service: it pulls locally")
        return False  # 1.x always pulls this way, and has no option for it
    return pull == "local-pull"


def expect_cri_path(node: ContainerdNode, local: bool) -> None:
    """containerd's debug log names the path a 2.1+ CRI pull took."""
    if node.runtime.cri_transfer_service:
        said = "using client.Pull()" if local else "using transfer service"
        assert said in node.log_text(), f"containerd did not pull {said!r}"


def serving_node(
    node_factory: NodeFactory, registry: Registry, image: images.TestImage, repo: str
) -> tuple[str, ContainerdNode, ShoalDaemon]:
    """A node holding `image` (pulled straight from the registry) and its shoal, which shares
    that registry's images (it is outside the allow-list: their status cannot be learned)."""
    ref = images.push(image, registry, repo, "v1")
    a = node_factory("a")
    a.pull(ref, via_hosts=False, plain_http=True)
    shoal = ShoalDaemon(a, extra_args=["--share-registries", registry.host]).start()
    return ref, a, shoal.wait_synced()


def fd_targets(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            continue  # closed meanwhile
    return out


def test_shoal_started_before_the_first_write_reads_blobs_from_disk(
    registry: Upstream, node_factory: NodeFactory
) -> None:
    """shoal connects to a fresh node, whose containerd has not created its content directory
    yet; after the first pull, shoal serves that pull's blobs from their files, not gRPC."""
    node = node_factory("fresh")
    if node.content_root.exists():
        pytest.skip(f"containerd {node.runtime.version} creates its content directory at boot")
    shoal = ShoalDaemon(node).start()  # connected: it answers only after it asked containerd
    big = images.layered_image([32 * 1024 * 1024], seed=17, name="first-write")
    ref = registry.add("first-write", big)
    node.pull(ref, via_hosts=False, plain_http=True)
    layer = big.layers[0]
    assert shoal.proc is not None and node.has_blob(layer.digest)
    url = f"{shoal.url}/v2/test/first-write/blobs/{layer.digest}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = resp.read(64 * 1024)
        # 32 MiB does not fit in the sockets' buffers: while this reader waits, shoal is still
        # sending, and it holds the blob's file open. Over gRPC it never opens that file.
        from_disk = str(node.blob_path(layer.digest)) in fd_targets(shoal.proc.pid)
        body += resp.read()
    assert hashlib.sha256(body).hexdigest() == layer.hex
    assert from_disk, "shoal read the blob over gRPC, not from the content directory"


@pytest.mark.parametrize("pull", PULL_MODES)
def test_cri_pull_is_served_by_shoal(node_factory: NodeFactory, tmp: Path, pull: str) -> None:
    """The kubelet's PullImage on node B, with the registry down: every blob comes from node
    A's shoal, through the transfer service (2.1+) or the local pull."""
    local = cri_mode(pull)
    registry = Registry(tmp / "registry").start()
    image = images.oci_image("cri-pull")
    ref, a, shoal = serving_node(node_factory, registry, image, "cri/app")
    b = node_factory("b", log_level="debug", local_pull=local)
    shoal_cli("configure", "--hosts-dir", str(b.hosts_dir), "--mirror", shoal.url,
              "--registry", f"{registry.host}=http://{registry.host}")  # fmt: skip
    registry.stop()
    before = local_blobs_served(shoal)
    cri_pull(b.socket, ref, timeout=120)
    assert b.images()[ref] == image.digest
    for digest in image.blobs:
        assert b.read_blob(digest) == a.read_blob(digest)
    assert local_blobs_served(shoal) - before >= 1 + len(image.layers)  # config and layers
    expect_cri_path(b, local)


@pytest.mark.parametrize("pull", PULL_MODES)
def test_hosts_dir_list_is_configured_in_its_first_directory(
    node_factory: NodeFactory, tmp: Path, pull: str
) -> None:
    """config_path `first:second`, as EKS ships it. `shoal configure --hosts-dir first:second`
    writes `first`, where containerd looks first, and `cleanup` restores it; `second` is never
    touched. The local pull reads the list; 2.x's transfer service takes it for one directory
    that does not exist, so its pulls skip every mirror (documented in the chart README)."""
    local = cri_mode(pull)
    registry = Registry(tmp / "registry").start()
    image = images.oci_image("hosts-list")
    ref, _, shoal = serving_node(node_factory, registry, image, "list/app")
    first, second = tmp / "certs.d", tmp / "docker-certs.d"
    (second / registry.host).mkdir(parents=True)
    theirs = hosts_toml(None, f"http://{registry.host}")
    (second / registry.host / "hosts.toml").write_text(theirs)
    listed = f"{first}:{second}"
    b = node_factory("b", local_pull=local, cri_config_path=listed)
    shoal_cli("configure", "--hosts-dir", listed, "--mirror", shoal.url,
              "--registry", f"{registry.host}=http://{registry.host}")  # fmt: skip
    assert shoal.url in (first / registry.host / "hosts.toml").read_text()
    before, mark = local_blobs_served(shoal), registry.mark()
    cri_pull(b.socket, ref, timeout=120)
    assert b.images()[ref] == image.digest
    served = local_blobs_served(shoal) - before
    from_registry = [r for r in registry.settle()[mark:] if "/blobs/" in r.path]
    if pull == "local-pull":
        assert served >= 1 + len(image.layers)
        assert from_registry == []
    else:
        assert served == 0, "the transfer service read a config_path list"
        assert from_registry
    shoal_cli("cleanup", "--hosts-dir", listed)
    assert not first.exists()  # configure created it
    assert (second / registry.host / "hosts.toml").read_text() == theirs


@pytest.mark.netns
def test_committed_layer_is_found_by_a_peer_while_the_pull_goes_on(
    network: Network, tmp: Path
) -> None:
    """Node A pulls a 4-layer image over a slow registry link, through its shoal, which misses
    (the registry is not one it fetches from), so containerd downloads every layer itself.
    No periodic resync runs. A layer A has committed is found by node B's lookup within 1 s of
    the commit, before A's pull ends: shoal follows containerd's /content/create."""
    rt = selected()
    if not rt.content_events:
        pytest.skip(
            f"containerd {rt.version} publishes no /content/create: a pulled layer is advertised "
            "once its image exists or at the next resync"
        )
    reg_ns = network.add("reg")
    registry = Registry(tmp / "registry", host_ip=reg_ns.ip, netns=reg_ns.name).start()
    mib = 1024 * 1024
    image = images.layered_image([mib, 12 * mib, 12 * mib, 12 * mib], seed=5, name="events")
    ref = images.push(image, registry, "events/app", "v1")
    reg_ns.limit("100mbit")  # ~4 s for the image: the small layer lands long before the end
    # Outside the allow-list, so shoal cannot learn whether the registry serves anyone: the
    # operator shares it, and a committed layer is attributed to it by containerd's labels.
    shared = ["--share-registries", registry.host]
    cluster = Cluster(network, tmp, registry, shoal_args=["--resync-interval", "3600", *shared])
    a, b = cluster.add_node("a"), cluster.add_node("b")
    for node in (a, b):
        cluster.start_shoal(node)
    cluster.wait_connected()

    # A trial whose first layer happens to be committed less than a second before the pull
    # ends (the host busy) cannot show the lookup: it is run again, with the image removed.
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    for trial in range(3):
        if trial:
            a.containerd.remove_all()
            time.sleep(2.0)  # its withdrawal reaches the DHT before the next pull
        result.clear()
        puller = threading.Thread(target=lambda: result.update(r=a.containerd.pull(ref)))
        layers = [layer.digest for layer in image.layers]
        committed: dict[str, float] = {}
        found: dict[str, float] = {}
        puller.start()
        while puller.is_alive():
            for digest in layers:
                if digest not in committed and a.containerd.has_blob(digest):
                    # Its last byte was written just before the commit: the mtime bounds it.
                    committed[digest] = a.containerd.blob_path(digest).stat().st_mtime
            for digest in list(committed):
                if digest not in found and a.ns.ip in b.providers(digest):
                    found[digest] = time.time()
            time.sleep(0.05)
        ended = time.time()
        puller.join()
        assert result["r"].returncode == 0
        first = min(committed, key=committed.__getitem__)
        if first in found or ended - committed[first] >= 1.0:
            break
        print(f"trial {trial}: the first layer was committed only "
              f"{ended - committed[first]:.1f}s before the pull ended; again")  # fmt: skip
    assert first in found and found[first] < ended, (
        f"layer {first} was committed {ended - committed[first]:.1f}s before the pull ended, "
        "but node B's lookup did not find node A"
    )
    delay = found[first] - committed[first]
    print(f"node B found the first committed layer {delay:.2f}s after the commit")
    assert delay <= 1.0
