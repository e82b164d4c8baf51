"""What a manifest or an index references, read from its JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from shoal.oci.digest import Digest
from shoal.oci.errors import DigestInvalid
from shoal.oci.mediatypes import INDEX_TYPES, MANIFEST_TYPES

Kind = Literal["index", "manifest", "config", "layer", "blob"]


@dataclass(frozen=True)
class RawDescriptor:
    """A descriptor as manifest JSON or a containerd record states it. Its digest is a string,
    checked where it is used (`shoal.content.model.Descriptor` holds a parsed one)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)


def platform_text(platform: Any) -> str | None:
    """`os/arch[/variant]` of an index entry's `platform`."""
    if not isinstance(platform, Mapping):
        return None
    fields = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    return "/".join(p for p in fields if isinstance(p, str) and p) or None


def child_descriptor(entry: Any) -> RawDescriptor | None:
    """A descriptor from manifest JSON, or None when it is malformed (it is then skipped)."""
    if not isinstance(entry, Mapping):
        return None
    digest, size, media_type = entry.get("digest"), entry.get("size"), entry.get("mediaType", "")
    if not isinstance(digest, str) or not isinstance(media_type, str):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    try:
        Digest.parse(digest)
    except DigestInvalid:
        return None
    annotations = entry.get("annotations")
    if not isinstance(annotations, Mapping):
        annotations = {}
    return RawDescriptor(media_type, digest, size, dict(annotations))


def children(doc: Mapping[str, Any], media_type: str) -> list[tuple[RawDescriptor, Kind, Any]]:
    """What a manifest or an index references: (descriptor, kind, platform JSON), config first,
    then layers in order."""
    out: list[tuple[RawDescriptor, Kind, Any]] = []
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        for entry in entries if isinstance(entries, list) else ():
            desc = child_descriptor(entry)
            if desc is not None:
                out.append((desc, "manifest", entry.get("platform")))
    elif media_type in MANIFEST_TYPES:
        config = child_descriptor(doc.get("config"))
        if config is not None:
            out.append((config, "config", None))
        layers = doc.get("layers")
        for entry in layers if isinstance(layers, list) else ():
            desc = child_descriptor(entry)
            if desc is not None:
                out.append((desc, "layer", None))
    return out
