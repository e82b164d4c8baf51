"""Where a blob came from, by the labels containerd puts on what it pulled:
`containerd.io/distribution.source.<host>=<repository>[,<repository>…]`.

containerd drops the port from the host, so a label names a host, not a registry: it is
matched against every registry name this node knows on that host, and a blob counts as coming
from each of them (the caller shares it only if all of them may be shared).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PREFIX = "containerd.io/distribution.source."


def host_of(registry: str) -> str:
    """`host` of `host`, `host:port`, `[v6]:port` (as containerd's labels name it)."""
    if registry.startswith("["):
        return registry[1:].partition("]")[0]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def sources(labels: Mapping[str, str], known: Iterable[str]) -> list[tuple[str, str]]:
    """(registry, repository) pairs a blob may have come from. A host no known registry is on
    stands for itself (a registry on the default port)."""
    by_host: dict[str, set[str]] = {}
    for registry in known:
        by_host.setdefault(host_of(registry), set()).add(registry)
    out: list[tuple[str, str]] = []
    for key, value in labels.items():
        if not key.startswith(PREFIX):
            continue
        host = key[len(PREFIX) :].strip("[]")
        repositories = [r.strip() for r in value.split(",") if r.strip()]
        for registry in sorted(by_host.get(host, {host})):
            out.extend((registry, repo) for repo in repositories)
    return out
