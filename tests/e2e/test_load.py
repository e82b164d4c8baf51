"""`shoal load` on a real containerd: OCI archives, layout directories and docker-archives become
images with the names and labels a pull gives them; loading again changes nothing; a corrupt or
truncated archive is refused in one line and leaves neither an image nor content behind."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.e2e.conftest import NodeFactory
from tests.harness import images
from tests.harness.containerd import ContainerdNode

pytestmark = pytest.mark.e2e

AIRGAP = "registry.airgap.test:5000"


def shoal_load(node: ContainerdNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", "load", "--containerd-socket", str(node.socket),
         "--containerd-namespace", node.namespace, *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def oci_archive(image: images.TestImage, path: Path, tag: str) -> Path:
    """An OCI archive (a tar of an OCI image layout), as `skopeo copy oci-archive:` writes."""
    layout = images.write_oci_layout(image, path.with_suffix(".layout"), tag=tag)
    with tarfile.open(path, "w") as tar:
        for member in ("oci-layout", "index.json", "blobs"):
            tar.add(layout / member, arcname=member)
    return path


def docker_archive(image: images.Image, path: Path, tags: list[str]) -> Path:
    """A docker-archive as `docker save` wrote it before Docker 25: `<id>/layer.tar` holding each
    layer uncompressed, the config as `<hex>.json`, and manifest.json; a repeated layer is a
    symlink to the first copy, as docker save writes it."""
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        layer_paths = []
        for i, layer in enumerate(image.layers):
            add(f"layer{i}/layer.tar", gzip.decompress(layer.data))
            layer_paths.append(f"layer{i}/layer.tar")
        link = tarfile.TarInfo("again/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../layer0/layer.tar"
        tar.addfile(link)
        add(f"{image.config.hex}.json", image.config.data)
        manifest = [{"Config": f"{image.config.hex}.json", "RepoTags": tags,
                     "Layers": [*layer_paths, "again/layer.tar"]}]  # fmt: skip
        add("manifest.json", json.dumps(manifest).encode())
    return path


def labels_of(node: ContainerdNode) -> dict[str, dict[str, str]]:
    out = {}
    for line in node.ctr("content", "ls").stdout.splitlines()[1:]:
        digest, *_, labels = line.split("\t")
        out[digest] = dict(kv.split("=", 1) for kv in labels.split(",") if "=" in kv)
    return out


def collect(node: ContainerdNode) -> None:
    """Runs containerd's garbage collection now (deleting a lease with --sync waits for one)."""
    node.ctr("leases", "create", "--id", "shoal-test-gc")
    node.ctr("leases", "delete", "--sync", "shoal-test-gc")


def image_record(node: ContainerdNode, name: str) -> str:
    return node.ctr("images", "ls", f"name=={name}").stdout


def test_oci_archive_loads_with_pull_labels_and_again_changes_nothing(
    node_factory: NodeFactory, tmp: Path
) -> None:
    node = node_factory("load")
    image = images.oci_image("load-oci")
    archive = oci_archive(image, tmp / "app.tar", tag=f"{AIRGAP}/team/app:v1")
    first = shoal_load(node, str(archive))
    assert first.returncode == 0, first.stderr
    assert f"created   {AIRGAP}/team/app:v1 {image.digest}" in first.stdout
    assert node.images() == {f"{AIRGAP}/team/app:v1": image.digest}
    labels = labels_of(node)
    for digest in image.blobs:
        assert (
            labels[digest]["containerd.io/distribution.source.registry.airgap.test"] == "team/app"
        )
    gc = labels[image.digest]
    assert gc["containerd.io/gc.ref.content.config"] == image.config.digest
    assert [gc[f"containerd.io/gc.ref.content.l.{i}"] for i in range(3)] == [
        layer.digest for layer in image.layers
    ]
    assert node.ctr("leases", "ls", "-q").stdout.split() == []
    for digest, blob in image.blobs.items():
        assert node.read_blob(digest) == blob.data
    # The lease is gone: only the image's gc references keep its blobs through a collection.
    collect(node)
    assert image.blobs.keys() <= node.content_digests()
    record = image_record(node, f"{AIRGAP}/team/app:v1")

    again = shoal_load(node, str(archive))
    assert again.returncode == 0, again.stderr
    assert f"unchanged {AIRGAP}/team/app:v1" in again.stdout
    assert (
        "0 blobs written" in again.stdout and f"{len(image.blobs)} already present" in again.stdout
    )
    assert labels_of(node) == labels
    assert image_record(node, f"{AIRGAP}/team/app:v1") == record  # not even updated


def test_layout_directory_with_a_bare_tag_needs_a_name(
    node_factory: NodeFactory, tmp: Path
) -> None:
    node = node_factory("layout")
    index = images.multiarch_index("load-multi")
    layout = images.write_oci_layout(index, tmp / "layout", tag="v2")
    refused = shoal_load(node, str(layout))
    assert refused.returncode == 1
    assert "--name" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert node.images() == {}
    loaded = shoal_load(node, str(layout), "--name", f"{AIRGAP}/multi")
    assert loaded.returncode == 0, loaded.stderr
    assert node.images() == {f"{AIRGAP}/multi:v2": index.digest}
    gc = labels_of(node)[index.digest]
    assert {gc["containerd.io/gc.ref.content.m.0"], gc["containerd.io/gc.ref.content.m.1"]} == {
        m.digest for m in index.manifests
    }


def test_docker_archive_becomes_a_schema2_image_named_as_docker_names_it(
    node_factory: NodeFactory, tmp: Path
) -> None:
    node = node_factory("docker")
    image = images.docker_schema2_image("load-docker")
    archive = docker_archive(image, tmp / "saved.tar", ["tool:1.0", f"{AIRGAP}/ops/tool:1.0"])
    loaded = shoal_load(node, str(archive))
    assert loaded.returncode == 0, loaded.stderr
    names = node.images()
    assert set(names) == {"docker.io/library/tool:1.0", f"{AIRGAP}/ops/tool:1.0"}
    [target] = set(names.values())
    manifest = json.loads(node.read_blob(target))
    assert manifest["mediaType"] == images.DOCKER_MANIFEST
    assert manifest["config"]["digest"] == image.config.digest
    # The layers are stored as saved, uncompressed: their digests are the config's diff ids.
    layers = manifest["layers"]
    assert [layer["digest"] for layer in layers] == [*image.diff_ids, image.diff_ids[0]]
    assert {layer["mediaType"] for layer in layers} == {
        "application/vnd.docker.image.rootfs.diff.tar"
    }
    labels = labels_of(node)
    assert labels[image.diff_ids[0]]["containerd.io/distribution.source.docker.io"] == (
        "library/tool"
    )
    assert labels[image.diff_ids[0]]["containerd.io/uncompressed"] == image.diff_ids[0]
    again = shoal_load(node, str(archive))
    assert again.stdout.count("unchanged") == 2, again.stdout


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing blob"])
def test_a_damaged_archive_is_refused_and_leaves_nothing(
    node_factory: NodeFactory, tmp: Path, damage: str
) -> None:
    node = node_factory("damaged")
    image = images.large_image(4, layers=2, seed=5, name="load-damaged")
    good = oci_archive(image, tmp / "good.tar", tag=f"{AIRGAP}/team/damaged:v1").read_bytes()
    bad = tmp / "bad.tar"
    if damage == "truncated":
        bad.write_bytes(good[: len(good) * 2 // 3])
    elif damage == "corrupt":
        at = good.index(image.layers[1].data[1000:1064])  # inside the second layer's bytes
        bad.write_bytes(good[:at] + bytes(64) + good[at + 64 :])
    else:
        layout = images.write_oci_layout(image, tmp / "partial", tag=f"{AIRGAP}/team/damaged:v1")
        (layout / "blobs" / "sha256" / image.layers[0].hex).unlink()
        with tarfile.open(bad, "w") as tar:
            tar.add(layout, arcname=".")
    before = node.content_digests()
    refused = shoal_load(node, str(bad))
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    print(line)
    assert line.startswith("shoal load: ") and "nothing was named" in line
    said = {"truncated": "truncated", "corrupt": "corrupt", "missing blob": "not in the"}
    assert said[damage] in line, line
    assert "Traceback" not in refused.stderr
    assert node.images() == {}
    assert node.ctr("leases", "ls", "-q").stdout.split() == []
    assert node.content_digests() == before  # what was written went with the lease
    assert active_ingests(node) == []


def active_ingests(node: ContainerdNode) -> list[str]:
    lines = node.ctr("content", "active").stdout.strip().splitlines()
    return [line for line in lines if line and not line.startswith("REF")]
