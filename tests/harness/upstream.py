"""An upstream registry together with the test images pushed to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import images as img
from .registry import Registry

__all__ = ["STANDARD_IMAGES", "Upstream", "standard_images"]

# key → repository; tags are always "v1".
STANDARD_IMAGES = {"oci": "test/oci", "multi": "test/multi", "docker": "test/docker"}


def standard_images() -> dict[str, img.TestImage]:
    """The three images every e2e session pushes (deterministic: same digests every run)."""
    return {
        "oci": img.oci_image("oci"),
        "multi": img.multiarch_index("multi"),
        "docker": img.docker_schema2_image("docker"),
    }


@dataclass
class Upstream:
    registry: Registry
    images: dict[str, img.TestImage] = field(default_factory=dict)
    repos: dict[str, str] = field(default_factory=dict)
    tag: str = "v1"

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def url(self) -> str:
        return self.registry.url

    def ref(self, key: str, host: str | None = None) -> str:
        """`host/repo:tag` of image `key` (on another host serving the same storage if given)."""
        return f"{host or self.host}/{self.repos[key]}:{self.tag}"

    @property
    def refs(self) -> dict[str, str]:
        return {k: self.ref(k) for k in self.images}

    def digest(self, key: str) -> str:
        """Top-level digest (the index digest for the multi-arch image)."""
        return self.images[key].digest

    @property
    def digests(self) -> dict[str, str]:
        return {k: im.digest for k, im in self.images.items()}

    def add(self, key: str, image: img.TestImage, repo: str | None = None) -> str:
        """Push another image; returns its reference."""
        repo = repo or f"test/{key}"
        img.push(image, self.registry, repo, self.tag, workdir=self.registry.base_dir)
        self.images[key] = image
        self.repos[key] = repo
        return self.ref(key)

    @classmethod
    def create(cls, base_dir: Path, **registry_kwargs: object) -> Upstream:
        """Start a registry in `base_dir` and push the standard images."""
        reg = Registry(Path(base_dir), **registry_kwargs).start()  # type: ignore[arg-type]
        up = cls(reg)
        try:
            for key, image in standard_images().items():
                up.add(key, image, STANDARD_IMAGES[key])
        except BaseException:
            reg.stop()
            raise
        return up

    def serve_on(
        self, base_dir: Path, host_ip: str, netns: str | None = None, **kwargs: object
    ) -> Upstream:
        """A second registry over the same storage, e.g. on a test network's bridge address
        (namespaces cannot reach 127.0.0.1 of the root namespace). Do not push to both."""
        reg = Registry(
            Path(base_dir),
            host_ip=host_ip,
            netns=netns,
            storage_dir=self.registry.storage_dir,
            **kwargs,  # type: ignore[arg-type]
        ).start()
        return Upstream(reg, dict(self.images), dict(self.repos), self.tag)
