"""docker-archives (`docker save`): `manifest.json` lists each image's config, its layer files
and its `RepoTags`; there is no registry manifest.

Why a Docker schema 2 manifest: the config is a Docker image config and the layers are stored
as they were saved (uncompressed tars, or gzip), and schema 2 has media types for exactly these
(`…rootfs.diff.tar` and `…rootfs.diff.tar.gzip`), as containerd's own importer makes. The
manifest names every blob by the digest of its bytes as stored, so what peers are served is
what the archive held, byte for byte; nothing is recompressed. Its JSON is written the same way
every time, so loading the same archive again yields the same digest (and changes nothing).

Docker 25 and later save an OCI layout as well (index.json and blobs/): that layout is loaded
instead, with the `RepoTags` as names where its index names none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.load.plan import Refused
from shoal.oci.mediatypes import DOCKER_MANIFEST

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Stored:
    """A file of the archive as written to the store."""

    digest: str
    size: int
    head: bytes  # its first bytes, to tell gzip from a plain tar


@dataclass(frozen=True)
class SavedImage:
    config: str  # the config's path in the archive
    layers: tuple[str, ...]
    tags: tuple[str, ...]


def saved_images(manifest_json: bytes) -> list[SavedImage]:
    try:
        doc = json.loads(manifest_json)
    except (ValueError, UnicodeDecodeError):
        raise Refused("manifest.json of the docker-archive is not JSON") from None
    if not isinstance(doc, list):
        raise Refused("manifest.json of the docker-archive is not a list of images")
    out = []
    for entry in doc:
        if not isinstance(entry, dict):
            raise Refused("manifest.json of the docker-archive has a malformed entry")
        config, layers, tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags")
        if not isinstance(config, str) or not _strings(layers):
            raise Refused("manifest.json of the docker-archive has an entry without Config/Layers")
        saved_tags: tuple[str, ...] = tuple(tags) if _strings(tags) and tags else ()
        out.append(SavedImage(config, tuple(layers or ()), saved_tags))
    return out


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _resolve(path: str, files: Mapping[str, Stored], links: Mapping[str, str]) -> Stored:
    seen = set()
    while path in links and path not in seen:
        seen.add(path)
        path = links[path]
    found = files.get(path)
    if found is None:
        raise Refused(f"the docker-archive names {path}, which it does not contain")
    return found


def layer_type(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return DOCKER_LAYER_GZIP
    if head.startswith(ZSTD_MAGIC):
        raise Refused("zstd-compressed layers in a docker-archive are not supported")
    return DOCKER_LAYER


def schema2_manifest(
    image: SavedImage, files: Mapping[str, Stored], links: Mapping[str, str]
) -> bytes:
    """The Docker schema 2 manifest of a saved image, naming its blobs as stored."""
    config = _resolve(image.config, files, links)
    layers = [_resolve(p, files, links) for p in image.layers]
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": config.size, "digest": config.digest},
        "layers": [
            {"mediaType": layer_type(layer.head), "size": layer.size, "digest": layer.digest}
            for layer in layers
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def config_digest(image: SavedImage, files: Mapping[str, Stored], links: Mapping[str, str]) -> str:
    return _resolve(image.config, files, links).digest
