"""Whether a registry serves a repository's content to anyone: learned, remembered on disk.

The question is asked of the registry itself, without credentials: an anonymous HEAD of a
manifest the node holds, through the upstream client (the anonymous Bearer token flow
included: Docker Hub needs it even for public images). 200 means public; 401/403 private; 404
private too (the node holds it, so the registry hides it or lost it: it cannot be shown
public). Anything else (unreachable, 5xx, a registry outside the allow-list, which shoal never
contacts) leaves the status unknown, and a status already learned stays as it was: an outage
must not turn private content public, nor make public content unshareable.

Statuses are kept per (registry, repository, manifest digest) in `<data-dir>/access.json`,
with when and how they were learned, so a restart does not forget them while the registry is
down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import aiohttp

from shoal.upstream.allowlist import Endpoint
from shoal.upstream.client import RegistryClient
from shoal.upstream.errors import UpstreamDenied, UpstreamError
from shoal.upstream.manifests import ACCEPT

log = logging.getLogger("shoal.tenancy")

MAX_ENTRIES = 50_000
PROBE_TIMEOUT = 15.0


class Status(StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


Key = tuple[str, str, str]  # registry (as containerd names it), repository, manifest digest


@dataclass(frozen=True)
class Learned:
    status: Status
    at: float  # wall-clock seconds (survives restarts)
    how: str  # "probe", "upstream" (fetched anonymously), "peer" (a peer shared it)


class StatusStore:
    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._entries: dict[Key, Learned] = self._load()
        self._dirty = False

    def get(self, key: Key) -> Learned | None:
        return self._entries.get(key)

    def repository(self, registry: str, repository: str) -> Status:
        """The latest status learned of any manifest of the repository (a registry grants
        pulls per repository)."""
        found = [v for k, v in self._entries.items() if k[0] == registry and k[1] == repository]
        return max(found, key=lambda v: v.at).status if found else Status.UNKNOWN

    def registries(self) -> set[str]:
        return {k[0] for k in self._entries}

    def put(self, key: Key, status: Status, how: str) -> bool:
        """Records a definitive answer; returns whether the status changed. UNKNOWN is never
        recorded: what was learned before stays."""
        if status is Status.UNKNOWN:
            return False
        old = self._entries.get(key)
        self._entries[key] = Learned(status, self.clock(), how)
        self._dirty = True
        if len(self._entries) > MAX_ENTRIES:
            oldest = sorted(self._entries, key=lambda k: self._entries[k].at)
            for stale in oldest[: len(self._entries) - MAX_ENTRIES]:
                del self._entries[stale]
        return old is None or old.status is not status

    def prune(self, keep: Collection[Key], younger_than: float) -> None:
        """Forgets what is neither in `keep` nor learned in the last `younger_than` seconds."""
        cutoff = self.clock() - younger_than
        gone = [k for k, v in self._entries.items() if k not in keep and v.at < cutoff]
        for key in gone:
            del self._entries[key]
        self._dirty = self._dirty or bool(gone)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        rows = [[*k, v.status.value, v.at, v.how] for k, v in self._entries.items()]
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"version": 1, "statuses": rows}))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as exc:
            log.warning("cannot record content statuses in %s: %s", self.path, exc)

    def _load(self) -> dict[Key, Learned]:
        if self.path is None:
            return {}
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return {}
        out: dict[Key, Learned] = {}
        rows = doc.get("statuses") if isinstance(doc, dict) else None
        for row in rows if isinstance(rows, list) else []:
            try:
                registry, repository, digest, status, at, how = row
                out[(str(registry), str(repository), str(digest))] = Learned(
                    Status(status), float(at), str(how)
                )
            except (TypeError, ValueError):
                continue
        return out


class AnonymousRegistries(Protocol):
    """The upstream client without credentials (shoal.upstream.UpstreamSource)."""

    client: RegistryClient

    def endpoint(self, registry: str | None) -> Endpoint | None: ...


class Prober:
    def __init__(self, upstream: AnonymousRegistries, timeout: float = PROBE_TIMEOUT) -> None:
        self.upstream = upstream
        self.timeout = timeout
        self.requests = 0  # probes that reached a registry (tests, logs)

    async def probe(self, key: Key) -> Status:
        registry, repository, digest = key
        endpoint = self.upstream.endpoint(registry)
        if endpoint is None:
            return Status.UNKNOWN  # not in the allow-list: never contacted
        self.requests += 1
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self.upstream.client.request(
                    endpoint, "HEAD", repository, "manifests", digest, headers=ACCEPT
                )
        except UpstreamDenied:
            return Status.PRIVATE
        except (UpstreamError, TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("cannot learn whether %s serves %s anonymously: %s", registry, repository, exc)
            return Status.UNKNOWN
        code = resp.status
        resp.release()
        if code == 200:
            return Status.PUBLIC
        if code == 404:
            return Status.PRIVATE
        return Status.UNKNOWN
