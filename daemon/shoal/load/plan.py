"""What a loaded archive becomes, decided before any name is created: which images, under which
names, and the labels containerd itself sets on pulled content; and the check that every
manifest and index references only blobs the archive holds, with the sizes it states.

Labels, as containerd's pull sets them: `containerd.io/distribution.source.<host>=<repos>` on
every blob of an image (host without its port, repositories comma separated), and on manifests
and indexes the `containerd.io/gc.ref.content.*` references to their children, so what an image
names survives garbage collection once the load's lease is gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from shoal.load.names import ImageName
from shoal.oci.manifest import RawDescriptor, children
from shoal.oci.mediatypes import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    manifest_media_type,
    parse_manifest,
)

SOURCE_LABEL = "containerd.io/distribution.source."
GC_CONFIG = "containerd.io/gc.ref.content.config"
GC_LAYER = "containerd.io/gc.ref.content.l."
GC_MANIFEST = "containerd.io/gc.ref.content.m."
UNCOMPRESSED = "containerd.io/uncompressed"
MAX_DEPTH = 4
UNCOMPRESSED_LAYERS = frozenset(
    {
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.oci.image.layer.v1.tar",
    }
)

ReadBlob = Callable[[str], Awaitable[bytes]]


class Refused(Exception):
    """The archive cannot be loaded as it is; the message says why, in one line."""


@dataclass(frozen=True)
class Held:
    """A blob the archive held, as written (or found already present) in the store."""

    digest: str
    size: int


@dataclass
class Plan:
    images: list[tuple[ImageName, RawDescriptor]] = field(default_factory=list)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # digest -> labels to set
    blobs: int = 0  # distinct blobs the named images use


class Planner:
    """Checks images against the blobs the archive held and collects their labels."""

    def __init__(self, held: Mapping[str, Held], read: ReadBlob) -> None:
        self.held = held
        self.read = read
        self.plan = Plan()
        self._graphs: dict[str, tuple[str, set[str]]] = {}  # top digest -> type, digests used

    async def add(self, name: ImageName, target: RawDescriptor) -> None:
        """Checks the image `target` (once per digest) and records it under `name`."""
        graph = self._graphs.get(target.digest)
        if graph is None:
            used: set[str] = set()
            media_type = await self._visit(target, "image", str(name), 0, used)
            graph = self._graphs[target.digest] = (media_type, used)
        media_type, used = graph
        for digest in used:
            labels = self.plan.labels.setdefault(digest, {})
            key = SOURCE_LABEL + name.source_host
            repos = set(filter(None, labels.get(key, "").split(",")))
            labels[key] = ",".join(sorted(repos | {name.repository}))
        typed = RawDescriptor(media_type, target.digest, target.size)
        self.plan.images.append((name, typed))
        self.plan.blobs = len(set().union(*(g[1] for g in self._graphs.values())))

    def _present(self, desc: RawDescriptor, what: str, image: str) -> None:
        held = self.held.get(desc.digest)
        if held is None:
            raise Refused(f"{image}: its {what} {desc.digest} is not in the archive")
        if held.size != desc.size:
            raise Refused(
                f"{image}: its {what} {desc.digest} is {held.size} bytes in the archive, "
                f"but {desc.size} where it is named"
            )

    async def _visit(
        self, desc: RawDescriptor, what: str, image: str, depth: int, used: set[str]
    ) -> str:
        """Checks a manifest or an index and what it references; returns its media type."""
        self._present(desc, what, image)
        used.add(desc.digest)
        if desc.size > MAX_MANIFEST_BYTES:
            raise Refused(f"{image}: its {what} {desc.digest} is too large for a manifest")
        body = await self.read(desc.digest)
        media_type = manifest_media_type(body, desc.media_type or None)
        doc = parse_manifest(body)
        if doc is None or media_type is None:
            raise Refused(f"{image}: {desc.digest} is not a manifest or an index")
        labels = self.plan.labels.setdefault(desc.digest, {})
        entries = children(doc, media_type)
        if media_type in INDEX_TYPES:
            listed = doc.get("manifests")
            if not isinstance(listed, list) or len(listed) != len(entries):
                raise Refused(f"{image}: index {desc.digest} lists malformed manifests")
            if depth >= MAX_DEPTH:
                raise Refused(f"{image}: indexes nested more than {MAX_DEPTH} deep")
            # An index lists every platform; an archive may hold only some (as a node does).
            present = [(i, c) for i, (c, _, _) in enumerate(entries) if c.digest in self.held]
            if not present:
                raise Refused(f"{image}: none of the manifests its index lists is in the archive")
            for i, child in present:
                labels[f"{GC_MANIFEST}{i}"] = child.digest
                await self._visit(child, "manifest", image, depth + 1, used)
            return media_type
        if media_type not in MANIFEST_TYPES:  # pragma: no cover - manifest_media_type's set
            raise Refused(f"{image}: {desc.digest} has the unknown type {media_type}")
        layers = doc.get("layers")
        if not isinstance(layers, list) or len(entries) != len(layers) + 1:
            raise Refused(f"{image}: manifest {desc.digest} has a malformed config or layer")
        for child, kind, _ in entries:
            self._present(child, kind, image)
            used.add(child.digest)
            if kind == "config":
                labels[GC_CONFIG] = child.digest
        for i, (child, _, _) in enumerate(entries[1:]):
            labels[f"{GC_LAYER}{i}"] = child.digest
            if child.media_type in UNCOMPRESSED_LAYERS:
                # An uncompressed layer is its own diff: the label containerd's unpack sets.
                self.plan.labels.setdefault(child.digest, {})[UNCOMPRESSED] = child.digest
        return media_type
