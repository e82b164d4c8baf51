"""What a tag means: the tag policy, decided in this one place.

- `upstream-first` (default): ask the upstream registry (answers cached for a few seconds); if it
  cannot be reached, the node's own images, then peers' tag records, then the last upstream
  answer. An upstream "no such tag" is final.
- `peers`: the node's images, then peers, then upstream (Spegel's behaviour: fast, maybe stale).
- `digest-only`: never resolve tags; containerd asks the registry and pulls by digest via shoal.

Registries outside the allow-list have no upstream to ask: their tags resolve from the node and
its peers (an air-gapped registry's images spread by tag that way).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from shoal.content.model import Descriptor, Source, SourceKind
from shoal.oci.names import Reference
from shoal.sources.chain import first_answer
from shoal.upstream.allowlist import Endpoint
from shoal.upstream.breaker import CircuitOpen
from shoal.upstream.errors import UpstreamError

log = logging.getLogger("shoal.tags")


class TagUpstream(Protocol):
    """What the policy asks of the upstream registries (shoal.upstream.UpstreamSource)."""

    def endpoint(self, registry: str | None) -> Endpoint | None: ...

    async def resolve(self, ref: Reference) -> Descriptor | None: ...

    async def lookup(self, ref: Reference) -> Descriptor | None: ...

    def last_known(self, ref: Reference) -> tuple[Descriptor, float] | None: ...


class TagPolicy:
    def __init__(self, policy: str, upstream: TagUpstream | None) -> None:
        if policy not in ("upstream-first", "peers", "digest-only"):
            raise ValueError(f"unknown tag policy {policy!r}")
        self.policy = policy
        self.upstream = upstream

    async def resolve(self, ref: Reference, sources: Sequence[Source]) -> Descriptor | None:
        """`sources` are what the request may use; the upstream counts only if among them."""
        if self.policy == "digest-only":
            return None
        others = [s for s in sources if s.name is not SourceKind.UPSTREAM]
        upstream = self.upstream
        if (
            upstream is None
            or len(others) == len(sources)
            or upstream.endpoint(ref.registry) is None
        ):
            return await first_answer(others, ref)
        if self.policy == "peers":
            return await first_answer(others, ref) or await upstream.resolve(ref)
        try:
            return await upstream.lookup(ref)
        except UpstreamError as exc:
            # An open circuit breaker logged its state change once; not once per tag asked.
            level = logging.DEBUG if isinstance(exc, CircuitOpen) else logging.WARNING
            log.log(
                level, "upstream cannot resolve %s (%s); asking the cluster", ref.image_name, exc
            )
        found = await first_answer(others, ref)
        if found is not None:
            return found
        known = upstream.last_known(ref)
        return None if known is None else known[0]
