"""Image walking over an in-memory content store."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from shoal.containerd.model import ContainerdNotFound
from shoal.containerd.walk import NodeImage, walk
from shoal.oci.manifest import RawDescriptor as Descriptor
from shoal.oci.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    manifest_media_type,
)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


class Store:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.reads: list[str] = []

    def add(self, data: bytes | dict[str, Any], media_type: str = "") -> Descriptor:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.blobs[digest] = raw
        return Descriptor(media_type, digest, len(raw))

    def drop(self, desc: Descriptor) -> None:
        del self.blobs[desc.digest]

    async def fetch(self, digest: str) -> bytes:
        self.reads.append(digest)
        try:
            return self.blobs[digest]
        except KeyError:
            raise ContainerdNotFound(digest) from None

    async def has(self, digest: str) -> bool:
        return digest in self.blobs

    async def walk(self, target: Descriptor) -> NodeImage:
        return await walk("example.com/app:1", target, self.fetch, self.has)


def ref(desc: Descriptor, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"digest": desc.digest, "size": desc.size, **extra}
    if desc.media_type:
        out["mediaType"] = desc.media_type
    return out


def image(
    store: Store,
    tag: str,
    *,
    docker: bool = False,
    declare: bool = True,
    layers: int = 2,
) -> tuple[Descriptor, Descriptor, list[Descriptor]]:
    config = store.add({"architecture": tag}, DOCKER_CONFIG if docker else OCI_CONFIG)
    layer_descs = [
        store.add(f"{tag}-layer-{i}".encode(), DOCKER_LAYER if docker else OCI_LAYER)
        for i in range(layers)
    ]
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": ref(config),
        "layers": [ref(d) for d in layer_descs],
    }
    if declare:
        doc["mediaType"] = media_type
    manifest = store.add(doc, media_type)
    return manifest, config, layer_descs


def platform(arch: str) -> dict[str, str]:
    return {"os": "linux", "architecture": arch}


async def test_oci_index_keeps_only_manifests_on_the_node() -> None:
    store = Store()
    amd, amd_config, amd_layers = image(store, "amd64")
    arm, arm_config, arm_layers = image(store, "arm64")
    for d in (arm, arm_config, *arm_layers):
        store.drop(d)  # the node pulled only its own platform
    index = store.add(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                ref(amd, platform=platform("amd64")),
                ref(arm, platform={**platform("arm64"), "variant": "v8"}),
            ],
        },
        OCI_INDEX,
    )
    node = await store.walk(index)
    assert [(b.digest, b.kind) for b in node.blobs] == [
        (index.digest, "index"),
        (amd.digest, "manifest"),
        (amd_config.digest, "config"),
        *[(d.digest, "layer") for d in amd_layers],
    ]
    assert node.get(amd.digest).platform == "linux/amd64"  # type: ignore[union-attr]
    assert node.get(amd.digest).media_type == OCI_MANIFEST  # type: ignore[union-attr]
    assert node.get(amd_layers[0].digest).size == amd_layers[0].size  # type: ignore[union-attr]
    assert node.missing == () and node.complete
    assert arm.digest not in node.digests
    assert arm.digest not in store.reads


async def test_docker_manifest_list_and_schema2() -> None:
    store = Store()
    manifest, config, layers = image(store, "amd64", docker=True)
    lst = store.add(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [ref(manifest, platform=platform("amd64"))],
        },
        DOCKER_MANIFEST_LIST,
    )
    node = await store.walk(lst)
    kinds = {b.digest: (b.kind, b.media_type) for b in node.blobs}
    assert kinds[lst.digest] == ("index", DOCKER_MANIFEST_LIST)
    assert kinds[manifest.digest] == ("manifest", DOCKER_MANIFEST)
    assert kinds[config.digest] == ("config", DOCKER_CONFIG)
    assert all(kinds[d.digest] == ("layer", DOCKER_LAYER) for d in layers)


async def test_single_manifest_target() -> None:
    store = Store()
    manifest, config, layers = image(store, "amd64", docker=True)
    node = await store.walk(manifest)
    assert node.digests == {manifest.digest, config.digest, *(d.digest for d in layers)}
    assert node.blobs[0].kind == "manifest"


async def test_media_type_detected_from_content_when_undeclared() -> None:
    store = Store()
    manifest, _, _ = image(store, "amd64", declare=False)
    index = store.add(
        {"schemaVersion": 2, "manifests": [{"digest": manifest.digest, "size": manifest.size}]}
    )
    # Neither the index nor its entry says a media type: both come from the JSON's shape.
    node = await store.walk(Descriptor("", index.digest, index.size))
    assert node.get(index.digest).media_type == OCI_INDEX  # type: ignore[union-attr]
    assert node.get(manifest.digest).media_type == OCI_MANIFEST  # type: ignore[union-attr]
    assert node.complete


async def test_absent_layer_is_missing() -> None:
    store = Store()
    manifest, config, layers = image(store, "amd64")
    store.drop(layers[1])
    node = await store.walk(manifest)
    assert node.missing == (layers[1].digest,)
    assert not node.complete
    assert layers[1].digest not in node.digests
    assert config.digest in node.digests


async def test_absent_target() -> None:
    store = Store()
    manifest, _, _ = image(store, "amd64")
    store.drop(manifest)
    node = await store.walk(manifest)
    assert node.blobs == () and node.missing == (manifest.digest,)
    assert not node.complete


async def test_invalid_target_digest() -> None:
    node = await Store().walk(Descriptor(OCI_MANIFEST, "sha256:../../etc/passwd", 10))
    assert node.blobs == () and not node.complete


async def test_target_that_is_no_manifest_is_kept_as_a_blob() -> None:
    store = Store()
    blob = store.add(b"\x00not json", "application/octet-stream")
    node = await store.walk(blob)
    assert [(b.digest, b.kind) for b in node.blobs] == [(blob.digest, "blob")]


async def test_nested_index_and_malformed_entries() -> None:
    store = Store()
    manifest, _, _ = image(store, "amd64")
    inner = store.add(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [ref(manifest)]}, OCI_INDEX
    )
    outer = store.add(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                ref(inner),
                {"digest": "sha256:zz", "size": 1},
                {"digest": manifest.digest, "size": -1},
                {"digest": manifest.digest, "size": True},
                "nonsense",
                None,
            ],
        },
        OCI_INDEX,
    )
    node = await store.walk(outer)
    assert [b.kind for b in node.blobs] == [
        "index",
        "index",
        "manifest",
        "config",
        "layer",
        "layer",
    ]
    assert node.complete


async def test_shared_blobs_are_listed_once() -> None:
    store = Store()
    a, _, _ = image(store, "same")
    index = store.add(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [ref(a), ref(a)]}, OCI_INDEX
    )
    node = await store.walk(index)
    assert len(node.blobs) == len(node.digests) == 5


async def test_manifest_deleted_during_walk_is_missing() -> None:
    store = Store()
    manifest, _, _ = image(store, "amd64")

    async def gone(digest: str) -> bytes:
        raise ContainerdNotFound(digest)

    node = await walk("x/y:1", manifest, gone, store.has)
    assert node.missing == (manifest.digest,)


@pytest.mark.parametrize(
    ("doc", "hint", "expected"),
    [
        ({"mediaType": DOCKER_MANIFEST, "config": {}, "layers": []}, OCI_MANIFEST, DOCKER_MANIFEST),
        ({"schemaVersion": 2, "config": {}, "layers": []}, DOCKER_MANIFEST, DOCKER_MANIFEST),
        ({"schemaVersion": 2, "config": {}, "layers": []}, "", OCI_MANIFEST),
        ({"schemaVersion": 2, "manifests": []}, "application/octet-stream", OCI_INDEX),
        ({"schemaVersion": 2, "manifests": []}, OCI_MANIFEST, OCI_INDEX),  # shape beats a bad hint
        ({"schemaVersion": 2, "mediaType": "application/x-unknown"}, OCI_MANIFEST, None),
        ({"schemaVersion": 1}, "", None),
    ],
)
def test_manifest_type(doc: dict[str, Any], hint: str, expected: str | None) -> None:
    assert manifest_media_type(json.dumps(doc).encode(), hint) == expected


def test_manifest_type_of_garbage() -> None:
    assert manifest_media_type(b"\xff\xfe", OCI_MANIFEST) is None
    assert manifest_media_type(b"[1, 2]", OCI_MANIFEST) is None
