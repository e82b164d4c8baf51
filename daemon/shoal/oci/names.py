"""Repository names, tags, registry hosts (`ns`) and the image names containerd stores."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from shoal.oci.digest import Digest
from shoal.oci.errors import NameInvalid

# The distribution spec's grammar for a repository name and a tag (always fullmatch(): `$` also
# matches before a final newline).
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_NAME_LENGTH = 255

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def parse_repository(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _REPOSITORY.fullmatch(name):
        raise NameInvalid("invalid repository name", {"name": name[:MAX_NAME_LENGTH]})
    return name


def is_tag(reference: str) -> bool:
    return bool(_TAG.fullmatch(reference))


def parse_registry_host(ns: str) -> str:
    """Validates a registry host as containerd sends it in `ns`: `host`, `host:port`, `[v6]:port`.

    Returns it lower-cased, with Docker Hub's aliases folded into `docker.io` as containerd names
    images. Anything else (paths, credentials, spaces, bad ports) is NAME_INVALID.
    """
    host = ns.strip().lower()
    if not host or len(host) > 261:
        raise NameInvalid("invalid ns", {"ns": ns[:261]})
    port = None
    if host.startswith("["):
        inner, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise NameInvalid("invalid ns", {"ns": ns})
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise NameInvalid("invalid ns", {"ns": ns}) from None
        port = rest[1:] if rest else None
    else:
        name, sep, port_text = host.partition(":")
        port = port_text if sep else None
        if not _is_hostname(name):
            raise NameInvalid("invalid ns", {"ns": ns})
    if port is not None and not (port.isascii() and port.isdigit() and port[0] != "0"):
        raise NameInvalid("invalid ns port", {"ns": ns})
    if port is not None and not 0 < int(port) < 65536:
        raise NameInvalid("invalid ns port", {"ns": ns})
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def _is_hostname(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    try:
        ipaddress.IPv4Address(name)
        return True
    except ValueError:
        pass
    return all(_LABEL.fullmatch(label) for label in name.split("."))


@dataclass(frozen=True)
class Reference:
    """What a request names: a repository within a registry, and a tag or a digest."""

    registry: str | None  # from `ns`; None when the client talks to shoal as its own registry
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def image_name(self) -> str | None:
        """containerd's image name for a tag, e.g. `docker.io/library/x:1`."""
        if self.registry is None or self.tag is None:
            return None
        return f"{self.registry}/{self.repository}:{self.tag}"


def make_reference(ns: str | None, repository: str, reference: str) -> Reference:
    """Builds a Reference from a request's `ns`, path name and tag-or-digest, validating all."""
    registry = parse_registry_host(ns) if ns is not None else None
    repo = parse_repository(repository)
    if registry == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"  # Docker Hub's official images, as containerd names them
    if ":" in reference:
        return Reference(registry, repo, digest=Digest.parse(reference))
    if not is_tag(reference):
        raise NameInvalid("invalid tag", {"tag": reference[:128]})
    return Reference(registry, repo, tag=reference)
