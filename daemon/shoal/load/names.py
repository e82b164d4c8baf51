"""Image names for loaded images, as containerd itself names pulled ones.

`docker save` names images as the Docker CLI does (`x:1`, `user/x:1`, `host:5000/x:1`); an OCI
layout names them in `org.opencontainers.image.ref.name`, either a full reference or a bare
tag. Both become containerd's full names: `docker.io/library/x:1`, `host:5000/x:1`. A name
without a registry belongs to `default_registry` (docker.io unless the operator says otherwise);
a bare tag needs the repository the operator gives (`--name`).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.oci.digest import Digest
from shoal.oci.errors import RegistryError
from shoal.oci.names import DOCKER_HUB, is_tag, parse_registry_host, parse_repository

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # what containerd and Docker 25+ write


class BadName(ValueError):
    """A name that cannot become an image name."""


@dataclass(frozen=True)
class ImageName:
    registry: str  # as containerd names it: docker.io, host:port
    repository: str  # docker.io official images under library/
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.tag is not None:
            return f"{self.registry}/{self.repository}:{self.tag}"
        return f"{self.registry}/{self.repository}@{self.digest}"

    @property
    def base(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def source_host(self) -> str:
        """The host in containerd's `containerd.io/distribution.source.<host>` label: the
        registry without its port."""
        host = self.registry
        if host.startswith("["):
            return host[1:].split("]", 1)[0]
        return host.rsplit(":", 1)[0] if ":" in host else host


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def normalize(reference: str, default_registry: str = DOCKER_HUB) -> ImageName:
    """`x:1` -> docker.io/library/x:1; `host:5000/a/b` -> host:5000/a/b:latest; digests kept."""
    text = reference.strip()
    if not text or len(text) > 512 or any(c.isspace() for c in text):
        raise BadName(f"not an image reference: {reference!r}")
    rest, _, digest = text.partition("@")
    first, slash, remainder = rest.partition("/")
    if slash and _looks_like_host(first):
        registry_text, path = first, remainder
    else:
        registry_text, path = default_registry, rest
    last = path.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        path, tag = path.rsplit(":", 1)
    try:
        registry = parse_registry_host(registry_text)
        if registry == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        repository = parse_repository(path)
        if digest:
            digest = str(Digest.parse(digest))
    except RegistryError as exc:
        raise BadName(f"not an image reference: {reference!r} ({exc})") from None
    if tag is not None and not is_tag(tag):
        raise BadName(f"not a valid tag in {reference!r}")
    if tag is None and not digest:
        tag = "latest"
    return ImageName(registry, repository, tag, digest or None)


def from_ref_name(value: str, base: str | None, default_registry: str = DOCKER_HUB) -> ImageName:
    """An OCI layout's name for an image: a full reference, or a bare tag of `base` (`--name`)."""
    if not any(c in value for c in ":/@") and is_tag(value):
        if base is None:
            raise BadName(
                f"the archive names an image only by the tag {value!r}: "
                "pass --name <registry>/<repository> to say whose tag it is"
            )
        name = normalize(base, default_registry)
        return ImageName(name.registry, name.repository, value)
    return normalize(value, default_registry)
