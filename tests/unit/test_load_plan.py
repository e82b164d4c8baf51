"""`shoal load`'s decisions without containerd: names as containerd gives them, the check of an
archive's images against the blobs it held, the labels a pull sets, docker-archive manifests."""

from __future__ import annotations

import json

import pytest

from shoal.load import docker
from shoal.load.names import BadName, from_ref_name, normalize
from shoal.load.plan import GC_CONFIG, GC_LAYER, GC_MANIFEST, SOURCE_LABEL, Held, Planner, Refused
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.manifest import RawDescriptor


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("tool:1.0", "docker.io/library/tool:1.0"),
        ("ops/tool", "docker.io/ops/tool:latest"),
        ("index.docker.io/ops/tool:2", "docker.io/ops/tool:2"),
        ("registry.airgap.test:5000/team/app:v1", "registry.airgap.test:5000/team/app:v1"),
        ("localhost/app:v1", "localhost/app:v1"),
    ],
)
def test_names_are_normalized_as_containerd_names_pulls(given: str, name: str) -> None:
    assert str(normalize(given)) == name


def test_names_without_a_registry_take_the_one_given() -> None:
    assert str(normalize("tool:1", "registry.internal:5000")) == "registry.internal:5000/tool:1"
    digest = "sha256:" + "a" * 64
    assert str(normalize(f"quay.io/a/b@{digest}")) == f"quay.io/a/b@{digest}"
    assert normalize("quay.io:8443/a/b:1").source_host == "quay.io"  # labels drop the port


@pytest.mark.parametrize("bad", ["", "UPPER/case:1", "a b:1", "x:not a tag", "host:99999/x:1"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(BadName):
        normalize(bad)


def test_a_bare_tag_needs_the_repository_the_operator_gives() -> None:
    with pytest.raises(BadName, match="--name"):
        from_ref_name("v1", None)
    assert str(from_ref_name("v1", "registry.test/app")) == "registry.test/app:v1"
    assert str(from_ref_name("registry.test/app:v2", "other/x")) == "registry.test/app:v2"


class Archive:
    """Blobs an archive held, readable as containerd would serve them."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}

    def add(self, body: bytes, media_type: str = "application/octet-stream") -> RawDescriptor:
        digest = str(Digest.of(body))
        self.bodies[digest] = body
        return RawDescriptor(media_type, digest, len(body))

    def held(self) -> dict[str, Held]:
        return {d: Held(d, len(b)) for d, b in self.bodies.items()}

    async def read(self, digest: str) -> bytes:
        return self.bodies[digest]

    def manifest(self, layers: int = 2) -> tuple[RawDescriptor, list[RawDescriptor]]:
        config = self.add(b'{"os":"linux"}', "application/vnd.oci.image.config.v1+json")
        parts = [self.add(f"layer {i}".encode(), "application/vnd.oci.image.layer.v1.tar")
                 for i in range(layers)]  # fmt: skip
        doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": _d(config),
               "layers": [_d(p) for p in parts]}  # fmt: skip
        return self.add(json.dumps(doc).encode(), mt.OCI_MANIFEST), [config, *parts]


def _d(desc: RawDescriptor) -> dict:
    return {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}


async def test_an_image_gets_the_labels_a_pull_sets() -> None:
    archive = Archive()
    manifest, (config, *layers) = archive.manifest()
    planner = Planner(archive.held(), archive.read)
    await planner.add(normalize("registry.test:5000/team/app:v1"), manifest)
    await planner.add(normalize("registry.test:5000/other/app:v1"), manifest)
    labels = planner.plan.labels
    assert labels[manifest.digest][GC_CONFIG] == config.digest
    assert [labels[manifest.digest][f"{GC_LAYER}{i}"] for i in range(2)] == [
        x.digest for x in layers
    ]
    source = SOURCE_LABEL + "registry.test"
    assert {labels[d][source] for d in archive.bodies} == {"other/app,team/app"}
    # Plain tar layers are their own uncompressed form: labelled as containerd's unpack does.
    assert labels[layers[0].digest]["containerd.io/uncompressed"] == layers[0].digest
    assert [str(n) for n, _ in planner.plan.images] == [
        "registry.test:5000/team/app:v1",
        "registry.test:5000/other/app:v1",
    ]
    assert planner.plan.blobs == 4


async def test_an_index_needs_one_platform_and_references_only_those_present() -> None:
    archive = Archive()
    here, _ = archive.manifest()
    elsewhere = RawDescriptor(mt.OCI_MANIFEST, "sha256:" + "e" * 64, 500)
    index = archive.add(
        json.dumps({"schemaVersion": 2, "manifests": [_d(elsewhere), _d(here)]}).encode()
    )
    planner = Planner(archive.held(), archive.read)
    await planner.add(normalize("registry.test/app:v1"), index)
    assert planner.plan.labels[index.digest] == {
        f"{GC_MANIFEST}1": here.digest,
        SOURCE_LABEL + "registry.test": "app",
    }
    assert planner.plan.images[0][1].media_type == mt.OCI_INDEX  # found from its shape
    lonely = archive.add(json.dumps({"schemaVersion": 2, "manifests": [_d(elsewhere)]}).encode())
    with pytest.raises(Refused, match="none of the manifests"):
        await Planner(archive.held(), archive.read).add(normalize("r.test/x:1"), lonely)


async def test_missing_or_resized_blobs_are_refused_before_any_name() -> None:
    archive = Archive()
    manifest, (config, layer, _) = archive.manifest()
    held = archive.held()
    del held[layer.digest]
    with pytest.raises(Refused, match=f"layer {layer.digest} is not in the archive"):
        await Planner(held, archive.read).add(normalize("r.test/x:1"), manifest)
    held = archive.held()
    held[config.digest] = Held(config.digest, config.size + 1)
    with pytest.raises(Refused, match="bytes in the archive"):
        await Planner(held, archive.read).add(normalize("r.test/x:1"), manifest)
    blob = archive.add(b"not a manifest")
    with pytest.raises(Refused, match="not a manifest"):
        await Planner(archive.held(), archive.read).add(normalize("r.test/x:1"), blob)


def test_docker_archive_manifests_name_the_blobs_as_saved_and_are_stable() -> None:
    files = {
        "c.json": docker.Stored("sha256:" + "c" * 64, 10, b"{"),
        "l0/layer.tar": docker.Stored("sha256:" + "0" * 64, 2048, b"app/\x00"),
        "l1/layer.tar": docker.Stored("sha256:" + "1" * 64, 99, b"\x1f\x8b\x08\x00"),
    }
    links = {"again/layer.tar": "l0/layer.tar"}
    [saved] = docker.saved_images(json.dumps([{
        "Config": "c.json", "RepoTags": ["tool:1"],
        "Layers": ["l0/layer.tar", "l1/layer.tar", "again/layer.tar"],
    }]).encode())  # fmt: skip
    body = docker.schema2_manifest(saved, files, links)
    assert body == docker.schema2_manifest(saved, files, links)
    doc = json.loads(body)
    assert doc["mediaType"] == mt.DOCKER_MANIFEST
    assert [(x["digest"][7], x["mediaType"].rsplit(".", 1)[-1]) for x in doc["layers"]] == [
        ("0", "tar"), ("1", "gzip"), ("0", "tar"),
    ]  # fmt: skip
    with pytest.raises(Refused, match="does not contain"):
        docker.schema2_manifest(docker.SavedImage("c.json", ("gone/layer.tar",), ()), files, links)
    with pytest.raises(Refused):
        docker.saved_images(b'{"not": "a list"}')
