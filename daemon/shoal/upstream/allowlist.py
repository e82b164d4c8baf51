"""Which registries shoal may contact, and at which URL. The one place this is decided.

The decision is pure string work on the registry name containerd sent in `ns`: no DNS lookup,
no connection. Names are compared exactly (port included); an IP literal is allowed only when
it is listed as such.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from yarl import URL

from shoal.oci.errors import NameInvalid
from shoal.oci.names import DOCKER_HUB, parse_registry_host

log = logging.getLogger("shoal.upstream")

DOCKER_HUB_URL = URL("https://registry-1.docker.io")

Origin = tuple[str, str, int]


def origin(url: URL) -> Origin:
    """(scheme, host, port) with the default port filled in: what "the same host" means here."""
    return (url.scheme, (url.host or "").lower(), url.port or 0)


@dataclass(frozen=True)
class Endpoint:
    registry: str  # the name as containerd uses it: docker.io, ghcr.io, 127.0.0.1:5000
    base: URL  # scheme://host[:port] the registry API lives under

    @property
    def origin(self) -> Origin:
        return origin(self.base)

    def url(self, path: str) -> URL:
        return self.base.with_path(path)


def _normalise(entries: Iterable[str], what: str) -> frozenset[str]:
    out = set()
    for entry in entries:
        try:
            out.add(parse_registry_host(entry))
        except NameInvalid:
            log.warning("ignoring invalid %s entry %r", what, entry)
    return frozenset(out)


class AllowList:
    def __init__(self, registries: Iterable[str], insecure: Iterable[str] = ()) -> None:
        self.registries = _normalise(registries, "mirror_registries")
        self.insecure = _normalise(insecure, "upstream_insecure")

    def endpoint(self, registry: str | None) -> Endpoint | None:
        """The endpoint to contact for `registry`, or None: then nothing may be sent anywhere.

        `registry` is re-validated even though References are built from validated input, so a
        hand-made Reference cannot smuggle a path, credentials or a port range past this check.
        """
        if registry is None:
            return None
        try:
            name = parse_registry_host(registry)
        except NameInvalid:
            return None
        if name not in self.registries:
            return None
        if name == DOCKER_HUB:
            return Endpoint(name, DOCKER_HUB_URL)
        scheme = "http" if name in self.insecure else "https"
        return Endpoint(name, URL(f"{scheme}://{name}"))
