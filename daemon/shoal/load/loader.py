"""`shoal load`: an image archive into the node's containerd, as a pull would have put it there.

1. Under a lease (so nothing written is collected midway, and everything is if the load fails),
   every blob of the archive is streamed into the content store with Content.Write and
   committed with its digest: the digest its path names (checked here while it streams, and by
   containerd at commit), or the digest of its bytes for a docker-archive's layer files. A blob
   already in the store is not written again, but its bytes in the archive are still hashed.
2. Every image is checked (`plan`): each manifest and index references only blobs the archive
   held, with the sizes it states. Only then are labels set and names created, so a truncated
   or corrupt archive leaves no image behind.
3. Images are created (or updated, or left unchanged when identical) with Images.Create, then
   the lease is deleted: the images' gc references keep their content.

Loading is the operator's act of sharing: images get `io.shoal.shareable=true`, which the
tenancy rules honour as an opt-in (`--private`: `false`, never shared).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from shoal.containerd.ingest import IngestClient
from shoal.containerd.model import Image
from shoal.load import docker
from shoal.load.archive import ArchiveError, Entry, Source
from shoal.load.names import CONTAINERD_NAME, REF_NAME, BadName, ImageName, from_ref_name, normalize
from shoal.load.plan import SOURCE_LABEL, Held, Planner, Refused
from shoal.oci.manifest import RawDescriptor, child_descriptor
from shoal.oci.mediatypes import DOCKER_MANIFEST, MAX_MANIFEST_BYTES, parse_manifest
from shoal.tenancy.access import SHAREABLE_LABEL

log = logging.getLogger("shoal.load")

LEASE_LABEL = "io.shoal.load"
LEASE_EXPIRY = timedelta(hours=2)  # a load that died midway leaves nothing for longer
_BLOB = re.compile(r"^blobs/(sha256|sha512)/([0-9a-f]{64}|[0-9a-f]{128})$")
_SAVED_CONFIG = re.compile(r"^([0-9a-f]{64})\.json$")
_DOCS = ("index.json", "manifest.json")


@dataclass(frozen=True)
class Options:
    name: str | None = None  # `--name`: the repository of bare tags, or the unnamed image's name
    registry: str = "docker.io"  # the registry of names that state none
    private: bool = False


@dataclass
class Outcome:
    images: list[tuple[str, str, str]] = field(default_factory=list)  # name, digest, change
    written: int = 0  # blobs written
    present: int = 0  # blobs the store already held
    bytes_written: int = 0


class Loader:
    def __init__(self, client: IngestClient, options: Options | None = None) -> None:
        self.client = client
        self.options = options or Options()
        self.outcome = Outcome()
        self.files: dict[str, docker.Stored] = {}  # path -> what it was stored as
        self.links: dict[str, str] = {}
        self.docs: dict[str, bytes] = {}
        self._run = os.urandom(4).hex()
        self._lease = ""

    async def load(self, source: Source) -> Outcome:
        lease = await self.client.create_lease(
            f"shoal-load-{self._run}", expire=LEASE_EXPIRY, labels={LEASE_LABEL: "1"}
        )
        self._lease = lease.id
        done: list[tuple[str, Image | None]] = []  # names created or changed, and what was there
        try:
            async for entry in source.entries():
                await self._take(entry)
            named = await self._images()
            planner = Planner(self.held(), self.client.read_blob)
            for name, target in named:
                await planner.add(name, target)
            await self._label(planner.plan.labels)
            for name, target in planner.plan.images:
                await self._name(name, target, done)
        except BaseException:
            await self._undo(done)
            await self.client.delete_lease(self._lease, sync=True)  # takes what was written
            raise
        await self.client.delete_lease(self._lease)
        return self.outcome

    def held(self) -> dict[str, Held]:
        return {s.digest: Held(s.digest, s.size) for s in self.files.values()}

    # -- 1. every blob into the store --------------------------------------------------------

    async def _take(self, entry: Entry) -> None:
        if entry.link is not None:
            self.links[entry.path] = entry.link
            return
        if entry.path in _DOCS:
            self.docs[entry.path] = await entry.read_small(MAX_MANIFEST_BYTES)
            return
        blob = _BLOB.match(entry.path)
        config = _SAVED_CONFIG.match(entry.path)
        if blob is not None:
            expected: str | None = f"{blob[1]}:{blob[2]}"
        elif config is not None:
            expected = f"sha256:{config[1]}"
        elif entry.path.endswith("/layer.tar"):
            expected = None  # a docker-archive layer: named by its bytes
        else:
            return  # oci-layout, repositories, legacy per-layer metadata: nothing to store
        self.files[entry.path] = await self._store(entry, expected)

    async def _store(self, entry: Entry, expected: str | None) -> docker.Stored:
        algorithm = expected.split(":", 1)[0] if expected else "sha256"
        hashing = hashlib.new(algorithm)
        head = bytearray()

        async def hashed() -> AsyncIterator[bytes]:
            async for chunk in entry.chunks():
                hashing.update(chunk)
                if len(head) < 8:
                    head.extend(chunk[: 8 - len(head)])
                yield chunk

        def matched() -> str:
            actual = f"{algorithm}:{hashing.hexdigest()}"
            if expected is not None and actual != expected:
                raise Refused(
                    f"{entry.path} in the archive is corrupt: its bytes hash to {actual}, "
                    f"not to the digest it is named by"
                )
            return actual

        info = None if expected is None else await self.client.info(expected)
        if info is not None and info.size == entry.size:
            async for _ in hashed():  # the archive is checked even where the store has it
                pass
            digest = matched()
            self.outcome.present += 1
        else:
            ref = f"shoal-load-{self._run}-{len(self.files)}"
            # Checked here before the commit (containerd checks again at commit).
            digest = await self.client.write_stream(
                hashed(), entry.size, matched, ref=ref, lease=self._lease
            )
            self.outcome.written += 1
            self.outcome.bytes_written += entry.size
        return docker.Stored(digest, entry.size, bytes(head))

    # -- 2. which images, by which names -------------------------------------------------------

    async def _images(self) -> list[tuple[ImageName, RawDescriptor]]:
        saved = (
            docker.saved_images(self.docs["manifest.json"]) if "manifest.json" in self.docs else []
        )
        if "index.json" in self.docs:
            found = await self._layout_images(saved)
        elif saved:
            found = [await self._saved_image(image) for image in saved]
        else:
            raise Refused("not an image archive: it has neither index.json nor manifest.json")
        named: list[tuple[ImageName, RawDescriptor]] = []
        unnamed = [target for names, target in found if not names]
        if unnamed:
            if self.options.name is None or len(unnamed) > 1:
                raise Refused(
                    f"the archive holds {len(unnamed)} image(s) without a name "
                    f"({unnamed[0].digest}): pass --name <registry>/<repository>:<tag> "
                    "(one image at a time)"
                )
            found = [(n or [self._name_option()], t) for n, t in found]
        for names, target in found:
            named.extend((name, target) for name in names)
        if not named:
            raise Refused("the archive holds no image")
        return named

    def _name_option(self) -> ImageName:
        assert self.options.name is not None
        return self._normalize(self.options.name)

    def _normalize(self, reference: str) -> ImageName:
        try:
            return normalize(reference, self.options.registry)
        except BadName as exc:
            raise Refused(str(exc)) from None

    async def _layout_images(
        self, saved: list[docker.SavedImage]
    ) -> list[tuple[list[ImageName], RawDescriptor]]:
        doc = parse_manifest(self.docs["index.json"])
        entries = doc.get("manifests") if doc else None
        if not isinstance(entries, list):
            raise Refused("index.json of the archive is not an OCI image index")
        tags_by_config = {
            docker.config_digest(s, self.files, self.links): s.tags for s in saved if s.tags
        }
        out = []
        for entry in entries:
            desc = child_descriptor(entry)
            if desc is None:
                raise Refused("index.json of the archive lists a malformed descriptor")
            value = desc.annotations.get(CONTAINERD_NAME) or desc.annotations.get(REF_NAME)
            names = []
            if value:
                try:
                    names.append(from_ref_name(value, self.options.name, self.options.registry))
                except BadName as exc:
                    raise Refused(str(exc)) from None
            elif tags_by_config:
                config = await self._config_of(desc)
                names = [self._normalize(t) for t in tags_by_config.get(config or "", ())]
            out.append((names, desc))
        return out

    async def _config_of(self, desc: RawDescriptor) -> str | None:
        """The config digest of a layout entry that is an image manifest (Docker 25+ saves)."""
        if desc.digest not in self.held() or desc.size > MAX_MANIFEST_BYTES:
            return None
        doc = parse_manifest(await self.client.read_blob(desc.digest))
        config = child_descriptor(doc.get("config")) if doc else None
        return None if config is None else config.digest

    async def _saved_image(self, image: docker.SavedImage) -> tuple[list[ImageName], RawDescriptor]:
        body = docker.schema2_manifest(image, self.files, self.links)
        digest = await self.client.write_blob(body, lease=self._lease)
        self.files[f"manifest:{digest}"] = docker.Stored(digest, len(body), b"")
        return [self._normalize(t) for t in image.tags], RawDescriptor(
            DOCKER_MANIFEST, digest, len(body)
        )

    # -- 3. labels and names ---------------------------------------------------------------------

    async def _label(self, wanted: dict[str, dict[str, str]]) -> None:
        for digest, labels in wanted.items():
            info = await self.client.info(digest)
            current = dict(info.labels) if info is not None else {}
            change = {}
            for key, value in labels.items():
                if key.startswith(SOURCE_LABEL):  # repositories add up, as pulls add them
                    repos = set(filter(None, current.get(key, "").split(","))) | set(
                        value.split(",")
                    )
                    value = ",".join(sorted(repos))
                if current.get(key) != value:
                    change[key] = value
            if change:
                await self.client.update_labels(digest, change)

    async def _name(
        self, name: ImageName, target: RawDescriptor, done: list[tuple[str, Image | None]]
    ) -> None:
        labels = {SHAREABLE_LABEL: "false" if self.options.private else "true"}
        text = str(name)
        old = await self.client.get_image(text)
        if old is None:
            await self.client.create_image(text, target, labels)
            change = "created"
        elif _same(old, target) and all(old.labels.get(k) == v for k, v in labels.items()):
            change = "unchanged"
        else:
            await self.client.update_image(text, target, labels)
            change = "updated"
        if change != "unchanged":
            done.append((text, old))
        self.outcome.images.append((text, target.digest, change))

    async def _undo(self, done: list[tuple[str, Image | None]]) -> None:
        for text, old in reversed(done):
            try:
                if old is None:
                    await self.client.delete_image(text)
                else:
                    await self.client.update_image(text, old.target, old.labels)
            except Exception as exc:  # the original error is the one to report
                log.warning("could not undo %s: %s", text, exc)


def _same(image: Image, target: RawDescriptor) -> bool:
    t = image.target
    return (t.digest, t.size, t.media_type) == (target.digest, target.size, target.media_type)


def describe(outcome: Outcome) -> list[str]:
    lines = [f"{change:9} {name} {digest}" for name, digest, change in outcome.images]
    lines.append(
        f"{outcome.written} blobs written ({outcome.bytes_written / 2**20:.1f} MiB), "
        f"{outcome.present} already present"
    )
    return lines


def progress_line(source: Source, outcome: Outcome) -> Callable[[], str]:
    def line() -> str:
        done, total = source.progress()
        share = f" of {total / 2**20:.1f} MiB ({100 * done / total:.0f}%)" if total else ""
        return (
            f"loading: {done / 2**20:.1f} MiB{share}, {outcome.written} blobs written, "
            f"{outcome.present} already present"
        )

    return line


__all__ = ["ArchiveError", "Loader", "Options", "Outcome", "Refused", "describe"]
