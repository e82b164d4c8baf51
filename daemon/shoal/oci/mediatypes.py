"""Media types of images, and telling a manifest's type from its bytes."""

from __future__ import annotations

import json
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ALL_MANIFEST_TYPES = MANIFEST_TYPES | INDEX_TYPES

OCTET_STREAM = "application/octet-stream"
# containerd rejects larger manifests; shoal never reads more than this into memory for one.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def parse_manifest(body: bytes) -> dict[str, Any] | None:
    """The manifest as a dict, or None when the bytes are not a JSON object."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def detect_media_type(body: bytes) -> str | None:
    """The media type of manifest bytes, or None if they are no manifest shoal can serve.

    OCI manifests and indexes may omit `mediaType`; then their shape decides, as in the image spec.
    """
    doc = parse_manifest(body)
    if doc is None:
        return None
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared if declared in ALL_MANIFEST_TYPES else None
    if doc.get("schemaVersion") != 2:
        return None
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
        return OCI_MANIFEST
    return None


def manifest_media_type(body: bytes, hint: str | None = None) -> str | None:
    """The media type to serve manifest bytes with, or None if they are no manifest shoal serves.

    A `mediaType` the document declares wins. A document without one (OCI allows that) gets
    the type its descriptor gave (`hint`, e.g. containerd's image record) when that agrees with
    its shape, else the type its shape implies.
    """
    doc = parse_manifest(body)
    if doc is None:
        return None
    declared = doc.get("mediaType")
    if declared:
        return declared if declared in ALL_MANIFEST_TYPES else None
    shape = detect_media_type(body)
    if shape is None or hint is None:
        return shape
    same_kind = (hint in INDEX_TYPES) == (shape in INDEX_TYPES) and hint in ALL_MANIFEST_TYPES
    return hint if same_kind else shape
