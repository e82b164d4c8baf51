"""Deterministic OCI / Docker test images, built offline and pushed with skopeo.

Same arguments, same bytes, same digests: tar members have fixed mtime/uid/gid/mode, gzip
headers carry mtime 0 and no file name, JSON is serialised with sorted keys and no spaces.
Images are written as an OCI image layout and pushed with `skopeo copy --preserve-digests`,
which refuses to convert anything, and the pushed manifest digest is checked afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .procs import HarnessError
from .registry import Registry, manifest_digest

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_MANIFEST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_MANIFEST",
    "Blob",
    "Image",
    "Index",
    "TestImage",
    "docker_schema2_image",
    "host_arch",
    "large_image",
    "multiarch_index",
    "oci_image",
    "push",
    "write_dir_layout",
    "write_oci_layout",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

_EPOCH = "1970-01-01T00:00:00Z"


def host_arch() -> str:
    """The node's GOARCH (what containerd picks from an index)."""
    import platform

    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, eq=False)
class Blob:
    media_type: str
    data: bytes = field(repr=False)

    @cached_property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True, eq=False)
class Image:
    """One manifest with its config and layers."""

    name: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]
    platform: dict[str, str]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def size(self) -> int:
        return self.manifest.size

    @property
    def blobs(self) -> dict[str, Blob]:
        """Every blob of the image, manifest first, by digest."""
        out = {self.manifest.digest: self.manifest, self.config.digest: self.config}
        out.update((b.digest, b) for b in self.layers)
        return out

    @property
    def total_size(self) -> int:
        return sum(b.size for b in self.blobs.values())

    @property
    def manifests(self) -> tuple[Image, ...]:
        return (self,)

    def for_platform(self, arch: str | None = None) -> Image:
        return self


@dataclass(frozen=True, eq=False)
class Index:
    """An OCI image index over several platform manifests."""

    name: str
    index: Blob
    manifests: tuple[Image, ...]

    @property
    def digest(self) -> str:
        return self.index.digest

    @property
    def media_type(self) -> str:
        return self.index.media_type

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def blobs(self) -> dict[str, Blob]:
        out = {self.index.digest: self.index}
        for m in self.manifests:
            out.update(m.blobs)
        return out

    @property
    def total_size(self) -> int:
        return sum(b.size for b in self.blobs.values())

    def for_platform(self, arch: str | None = None) -> Image:
        """The manifest containerd picks on a node of `arch` (this machine's by default)."""
        arch = arch or host_arch()
        for m in self.manifests:
            if m.platform.get("architecture") == arch:
                return m
        raise KeyError(arch)


TestImage = Image | Index


def _tar_layer(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d + "/")
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(ti)
            data = files[path]
            ti = tarfile.TarInfo("/".join(parts))
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _gzip(data: bytes, level: int) -> bytes:
    out = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything run-specific.
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=level, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


LayerSpec = bytes | Mapping[str, bytes]


def _build_image(
    name: str,
    layers: Sequence[LayerSpec],
    *,
    arch: str,
    docker: bool = False,
    gzip_level: int = 6,
) -> Image:
    layer_blobs: list[Blob] = []
    diff_ids: list[str] = []
    for i, spec in enumerate(layers):
        files = {f"{name}/layer-{i}.bin": spec} if isinstance(spec, bytes) else dict(spec)
        tar = _tar_layer(files)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        layer_blobs.append(Blob(DOCKER_LAYER if docker else OCI_LAYER, _gzip(tar, gzip_level)))
    platform = {"architecture": arch, "os": "linux"}
    config = {
        **platform,
        "created": _EPOCH,
        "config": {"Env": ["PATH=/bin"], "Labels": {"shoal.test/name": name}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": _EPOCH, "created_by": f"shoal test layer {i}"} for i in range(len(layers))
        ],
    }
    config_blob = Blob(DOCKER_CONFIG if docker else OCI_CONFIG, _json(config))
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in layer_blobs],
    }
    return Image(
        name=name,
        manifest=Blob(manifest_type, _json(manifest)),
        config=config_blob,
        layers=tuple(layer_blobs),
        diff_ids=tuple(diff_ids),
        platform=platform,
    )


def _default_layers(name: str, count: int) -> list[bytes]:
    # Small, distinct per image name, compressible (like real layers).
    return [(f"{name} layer {i}\n" * (200 * (i + 1))).encode() for i in range(count)]


def oci_image(
    name: str = "oci",
    layers: Sequence[LayerSpec] | None = None,
    *,
    arch: str | None = None,
) -> Image:
    """OCI manifest + config + gzip layers (3 by default). A layer is either the bytes of one
    file (`<name>/layer-<i>.bin`) or a mapping of paths to file contents."""
    return _build_image(name, layers or _default_layers(name, 3), arch=arch or host_arch())


def docker_schema2_image(
    name: str = "docker", layers: Sequence[LayerSpec] | None = None, *, arch: str | None = None
) -> Image:
    """Docker v2 schema 2 manifest with Docker config/layer media types."""
    return _build_image(
        name, layers or _default_layers(name, 3), arch=arch or host_arch(), docker=True
    )


def multiarch_index(
    name: str = "multi", archs: Iterable[str] = ("amd64", "arm64"), layers: int = 2
) -> Index:
    """OCI index with one linux manifest per arch; layers differ between arches."""
    manifests = tuple(
        _build_image(f"{name}-{arch}", _default_layers(f"{name}-{arch}", layers), arch=arch)
        for arch in archs
    )
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [m.manifest.descriptor(platform=m.platform) for m in manifests],
    }
    return Index(name=name, index=Blob(OCI_INDEX, _json(index)), manifests=manifests)


def large_image(
    total_mib: int = 64, *, layers: int = 4, seed: int = 0, name: str | None = None
) -> Image:
    """OCI image of `layers` layers holding `total_mib` MiB of incompressible bytes.

    Layers are gzip level 0 (stored blocks): the blob is as big as the data, and building
    128 MiB takes well under a second instead of several.
    """
    total = total_mib * 1024 * 1024
    sizes = [total // layers] * layers
    sizes[-1] += total - sum(sizes)
    return layered_image(sizes, seed=seed, name=name or f"large-{total_mib}m-{seed}")


def layered_image(sizes: Sequence[int], *, seed: int = 0, name: str = "layered") -> Image:
    """OCI image with one layer of about each of `sizes` bytes of incompressible data."""
    rng = random.Random(seed)
    piece = 64 * 1024 * 1024  # randbytes() cannot make 256 MiB at once
    specs: list[LayerSpec] = [
        b"".join(rng.randbytes(min(piece, n - i)) for i in range(0, n, piece)) for n in sizes
    ]
    return _build_image(name, specs, arch=host_arch(), gzip_level=0)


def write_oci_layout(image: TestImage, directory: Path, tag: str = "latest") -> Path:
    """Write `image` as an OCI image layout in `directory`, top descriptor tagged `tag`."""
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for blob in image.blobs.values():
        path = blobs_dir / blob.hex
        if not path.exists():
            path.write_bytes(blob.data)
    top = image.index if isinstance(image, Index) else image.manifest
    index = {
        "schemaVersion": 2,
        "manifests": [top.descriptor(annotations={"org.opencontainers.image.ref.name": tag})],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def write_dir_layout(image: Image, directory: Path) -> Path:
    """Write a single image in skopeo's `dir:` format (manifest.json + blobs named by hex).

    skopeo's `oci:` transport only finds OCI media types in index.json, so Docker schema 2
    images go through `dir:`, which copies the manifest bytes unchanged.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "version").write_text("Directory Transport Version: 1.1\n")
    (directory / "manifest.json").write_bytes(image.manifest.data)
    for blob in (image.config, *image.layers):
        path = directory / blob.hex
        if not path.exists():
            path.write_bytes(blob.data)
    return directory


def push(
    image: TestImage,
    registry: Registry | str,
    repo: str,
    tag: str = "latest",
    *,
    workdir: Path | None = None,
    verify: bool = True,
    timeout: float = 300,
) -> str:
    """Push with skopeo to `registry` (a `Registry` or "host:port"); returns the reference
    `host:port/repo:tag`. Raises if the registry's digest differs from the built one."""
    host = registry if isinstance(registry, str) else registry.host
    tmp = Path(tempfile.mkdtemp(prefix="shoal-oci-", dir=workdir))
    try:
        if isinstance(image, Image) and image.media_type == DOCKER_MANIFEST:
            src = f"dir:{write_dir_layout(image, tmp)}"
        else:
            src = f"oci:{write_oci_layout(image, tmp, tag)}:{tag}"
        cmd = [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]
        if isinstance(image, Index):
            cmd.append("--all")
        cmd += [src, f"docker://{host}/{repo}:{tag}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise HarnessError(f"skopeo push of {image.name} failed: {proc.stderr.strip()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verify:
        if isinstance(registry, Registry):
            got = registry.manifest_digest(repo, tag)
        else:
            got = manifest_digest(f"http://{host}", repo, tag)
        if got != image.digest:
            raise HarnessError(f"pushed {repo}:{tag} has digest {got}, built {image.digest}")
    return f"{host}/{repo}:{tag}"
