"""Air-gapped (issue 16), no registry anywhere: `shoal load` of an OCI archive on node 1; nodes 2
and 3 pull by tag and by digest through their own shoal, from node 1. Loading the same archive
again changes nothing. On the same cluster: `shoal status --cluster`, and the status page in
headless Chromium after a pull through a peer.

The registry's name resolves nowhere: a pull that did not come from a peer fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.cluster import METRICS, Cluster, Node, wait_until
from tests.harness.netns import Network
from tests.harness.procs import stop_all

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

AIRGAP = "registry.airgap.test:5000"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@dataclass(frozen=True)
class NoRegistry:
    """What the cluster harness needs of a registry (its name): there is none."""

    host: str


@dataclass
class World:
    cluster: Cluster
    image: images.Image
    archive: Path

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes


def load(node: Node, archive: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", "load", "--containerd-socket",
         str(node.containerd.socket), str(archive)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("airgap")
    net = Network("airgap").create()
    try:
        image = images.large_image(6, layers=2, seed=16, name="airgap")  # 3 MiB layers: redirected
        layout = images.write_oci_layout(image, base / "layout", tag=f"{AIRGAP}/team/app:v1")
        archive = base / "app.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(layout, arcname=".")
        cluster = Cluster(net, base, NoRegistry(AIRGAP))  # type: ignore[arg-type]
        for i in range(3):
            cluster.add_node(f"a{i + 1}")
        for node in cluster.nodes:
            cluster.start_shoal(node)
        cluster.wait_connected()
        yield World(cluster, image, archive)
    finally:
        stop_all()
        net.destroy()


def test_loaded_archive_is_pulled_by_tag_and_digest_from_peers(world: World) -> None:
    n1, n2, n3 = world.nodes
    loaded = load(n1, world.archive)
    assert loaded.returncode == 0, loaded.stderr
    ref = f"{AIRGAP}/team/app:v1"
    assert n1.containerd.images() == {ref: world.image.digest}
    wait_until(lambda: n1.ns.ip in n2.providers(ref), 30, "node 1 advertises the loaded tag")
    wait_until(lambda: n1.ns.ip in n3.providers(world.image.layers[1].digest), 30,
               "node 1 advertises the loaded layers")  # fmt: skip

    n2.containerd.pull(ref)
    n3.containerd.pull(f"{AIRGAP}/team/app@{world.image.digest}")
    assert n2.containerd.images()[ref] == world.image.digest
    for node in (n2, n3):
        for digest, blob in world.image.blobs.items():
            assert node.containerd.read_blob(digest) == blob.data
        assert node.metric("shoal_requests_total", source="peer") >= 3
        assert node.metric("shoal_requests_total", source="upstream") == 0
    assert n1.metric("shoal_bytes_to_peers_total") >= 2 * world.image.layers[0].size

    again = load(n1, world.archive)
    assert again.returncode == 0, again.stderr
    assert f"unchanged {ref}" in again.stdout and "0 blobs written" in again.stdout


def test_status_cluster_lists_every_node_with_its_readiness(world: World) -> None:
    n1 = world.nodes[0]
    proc = n1.ns.exec(
        [sys.executable, "-m", "shoal.cli", "status", "--cluster", "--address",
         f"{n1.ns.ip}:{METRICS}"],
    )  # fmt: skip
    print(proc.stdout)
    header, *rows = proc.stdout.strip().splitlines()
    assert header.split()[:3] == ["node", "address", "ready"]
    addresses = {row.split()[1]: row.split()[2] for row in rows}
    assert addresses == {f"{n.ns.ip}:{METRICS}": "yes" for n in world.nodes}
    as_json = n1.ns.exec([sys.executable, "-m", "shoal.cli", "status", "--cluster", "--json",
                          "--address", f"{n1.ns.ip}:{METRICS}"])  # fmt: skip
    ids = {a["status"]["node"]["peer_id"] for a in json.loads(as_json.stdout)}
    assert ids == {n.peer_id() for n in world.nodes}


def _browser(user_dir: Path):  # type: ignore[no-untyped-def]
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev extra")
    from selenium.webdriver.chrome.service import Service

    for binary in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(binary).exists():
            pytest.skip(f"needs {binary} (Debian's chromium and chromium-driver; setup.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1600",
                 f"--user-data-dir={user_dir}"):  # fmt: skip
        options.add_argument(flag)
    # The Debian driver, never one selenium would fetch.
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_status_page_in_chromium_shows_the_peer_pull_on_both_ends(world: World) -> None:
    n1, n2, _ = world.nodes
    ref = f"{AIRGAP}/team/app:v1"
    if ref not in n1.containerd.images():
        assert load(n1, world.archive).returncode == 0
        wait_until(lambda: n1.ns.ip in n2.providers(ref), 30, "node 1 advertises the tag")
    if ref not in n2.containerd.images():
        n2.containerd.pull(ref)
    user_dir = Path(tempfile.mkdtemp(prefix="shoal-chromium-"))
    ARTIFACTS.mkdir(exist_ok=True)
    driver = _browser(user_dir)
    try:
        from selenium.webdriver.common.by import By

        driver.set_page_load_timeout(30)
        driver.get(f"http://{n2.ns.ip}:{METRICS}/status")
        assert driver.find_element(By.ID, "readiness").text == "ready"
        rows = driver.find_elements(By.CSS_SELECTOR, "#pulls tr.pull")
        peer_rows = [r for r in rows if r.get_attribute("data-source") == "peer"]
        assert peer_rows, [r.text for r in rows]
        assert any(n1.ns.ip in r.text and "team/app" in r.text for r in peer_rows)
        assert driver.find_elements(By.CSS_SELECTOR, "#served svg rect")  # the chart has bars
        puller_shot = ARTIFACTS / "status-puller.png"
        driver.save_screenshot(str(puller_shot))

        driver.get(f"http://{n1.ns.ip}:{METRICS}/status")
        rows = driver.find_elements(By.CSS_SELECTOR, "#pulls tr.pull")
        served = [r for r in rows if r.get_attribute("data-source") == "local"
                  and r.get_attribute("data-asker") == "peer"]  # fmt: skip
        assert served, [r.text for r in rows]
        to_peers = driver.find_element(By.CSS_SELECTOR, '.card[data-series="to_peers"] b').text
        local = driver.find_element(By.CSS_SELECTOR, '.card[data-series="local"] b').text
        assert to_peers.endswith("MiB") and local.endswith("MiB"), (to_peers, local)
        holder_shot = ARTIFACTS / "status-holder.png"
        driver.save_screenshot(str(holder_shot))
        print(f"screenshots: {puller_shot} {holder_shot}")
        assert puller_shot.stat().st_size > 10_000 and holder_shot.stat().st_size > 10_000
    finally:
        driver.quit()
        shutil.rmtree(user_dir, ignore_errors=True)
