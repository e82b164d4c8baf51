"""Which blobs of an image a node holds: index -> present manifests -> config and layers.

A node pulls only its own platform from a multi-arch index, so an index's other manifests are
normally absent; that is not an error. What a present manifest references but the store lacks
(a pull in progress, or content GC'd) is reported as `missing`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shoal.containerd.model import ContainerdNotFound
from shoal.oci.digest import Digest
from shoal.oci.errors import DigestInvalid
from shoal.oci.manifest import Kind, RawDescriptor, children, platform_text
from shoal.oci.mediatypes import (
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    manifest_media_type,
    parse_manifest,
)

ReadManifest = Callable[[str], Awaitable[bytes]]
Has = Callable[[str], Awaitable[bool]]
# Indexes may nest; a bound keeps a malicious or broken store from recursing forever.
MAX_DEPTH = 4


@dataclass(frozen=True)
class ImageBlob:
    """One blob of an image present on the node. `platform` (`os/arch[/variant]`) is set for
    manifests reached through an index that declares one. `kind` "blob" is content whose
    manifest type shoal does not know (kept so it can still be served by digest)."""

    digest: str
    media_type: str
    size: int
    kind: Kind
    platform: str | None = None


@dataclass(frozen=True)
class NodeImage:
    name: str
    target: RawDescriptor
    blobs: tuple[ImageBlob, ...]
    missing: tuple[str, ...] = ()

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(b.digest for b in self.blobs)

    @property
    def complete(self) -> bool:
        """The target and everything its present manifests reference are in the store."""
        return bool(self.blobs) and not self.missing

    def get(self, digest: str) -> ImageBlob | None:
        return next((b for b in self.blobs if b.digest == digest), None)


async def walk(name: str, target: RawDescriptor, fetch: ReadManifest, has: Has) -> NodeImage:
    """Walks the image from `target`. `fetch(digest)` returns a manifest's bytes (raising
    ContainerdNotFound if gone, ValueError if too large); `has(digest)` tells whether the
    store holds a committed blob."""
    found: dict[str, ImageBlob] = {}
    missing: list[str] = []

    async def visit(
        desc: RawDescriptor, kind: Kind, platform: str | None, depth: int, optional: bool
    ) -> None:
        if desc.digest in found or desc.digest in missing:
            return
        if not await has(desc.digest):
            if not optional:
                missing.append(desc.digest)
            return
        if kind in ("config", "layer"):
            found[desc.digest] = ImageBlob(desc.digest, desc.media_type, desc.size, kind)
            return
        body: bytes | None = None
        if desc.size <= MAX_MANIFEST_BYTES:
            try:
                body = await fetch(desc.digest)
            except ContainerdNotFound:
                # Deleted between `has` and the read.
                if not optional:
                    missing.append(desc.digest)
                return
            except ValueError:
                body = None
        media_type = manifest_media_type(body, desc.media_type) if body is not None else None
        doc = parse_manifest(body) if body is not None and media_type else None
        if media_type is None or doc is None:
            found[desc.digest] = ImageBlob(
                desc.digest, desc.media_type, desc.size, "blob", platform
            )
            return
        is_index = media_type in INDEX_TYPES
        found[desc.digest] = ImageBlob(
            desc.digest,
            media_type,
            desc.size,
            "index" if is_index else "manifest",
            platform,
        )
        if depth >= MAX_DEPTH:
            return
        for child, child_kind, child_platform in children(doc, media_type):
            await visit(
                child,
                child_kind,
                platform_text(child_platform) if is_index else None,
                depth + 1,
                # An index lists every platform; a node holds only its own.
                optional=is_index,
            )

    try:
        Digest.parse(target.digest)
    except DigestInvalid:
        return NodeImage(name, target, (), (target.digest,))
    await visit(target, "manifest", None, 0, optional=False)
    return NodeImage(name, target, tuple(found.values()), tuple(missing))
