"""The upstream registry as a Source (name "upstream").

Tag policy is not decided here (`shoal.sources.tags` is). For a tag, upstream's answer:

- `resolve(ref)`: upstream's answer, shared for `tag_ttl` seconds; None when upstream says the
  tag does not exist, is not allowed, or cannot be asked.
- `lookup(ref)`: like `resolve` but raises UpstreamError when upstream cannot be asked, so
  "does not exist" (None) and "unreachable" (exception) can be told apart.
- `last_known(ref)`: the last answer and its age, without any request.

`find` never raises for upstream failures (it answers None so that the registry answers 404 and
containerd goes direct); the Blobs it returns raise UpstreamError subclasses midway. While an
origin's circuit breaker is open (`shoal.upstream.breaker`), these answer at once, and say so
in the breaker's one log line rather than one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp.abc import AbstractResolver

from shoal.content.memory import MemoryBlob
from shoal.content.model import Blob, ContentKind, Descriptor, SourceKind
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.upstream.allowlist import AllowList, Endpoint
from shoal.upstream.auth import Authenticator
from shoal.upstream.blobs import UpstreamBlob, blob_size
from shoal.upstream.breaker import BreakerPolicy, Breakers, CircuitOpen
from shoal.upstream.client import RegistryClient
from shoal.upstream.credentials import Credentials
from shoal.upstream.errors import UpstreamError, UpstreamUnavailable
from shoal.upstream.manifests import get_manifest, head_tag
from shoal.upstream.tagcache import TagCache, TagKey
from shoal.upstream.transport import RetryPolicy, Timeouts, Transport

if TYPE_CHECKING:
    from shoal.config import Settings

log = logging.getLogger("shoal.upstream")


class UpstreamSource:
    name = SourceKind.UPSTREAM

    def __init__(
        self,
        registries: Iterable[str],
        *,
        insecure: Iterable[str] = (),
        credentials: str | None = None,
        tag_ttl: float = 30.0,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        verify_blobs: bool = True,
        resolver: AbstractResolver | None = None,
        trust_env: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`registries`: the allow-list; `insecure`: those reached over plain HTTP;
        `credentials`: a docker config.json path; `resolver`: aiohttp's DNS resolver (tests);
        `trust_env`: honour HTTP(S)_PROXY; `verify_blobs`: hash whole-blob reads here too."""
        self.allowlist = AllowList(registries, insecure)
        self.transport = Transport(
            timeouts=timeouts,
            retry=retry,
            resolver=resolver,
            trust_env=trust_env,
            breakers=Breakers(breaker, clock=clock),
        )
        self.auth = Authenticator(
            self.transport, Credentials(credentials, clock=clock), clock=clock
        )
        self.client = RegistryClient(self.transport, self.auth)
        self.tags = TagCache(tag_ttl, clock=clock)
        self.verify_blobs = verify_blobs
        self.clock = clock
        self._inflight: dict[TagKey, asyncio.Future[Descriptor | None]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, verify_blobs: bool = True) -> UpstreamSource:
        return cls(
            settings.mirror_registries,
            insecure=settings.upstream_insecure,
            credentials=settings.upstream_credentials or None,
            tag_ttl=settings.tag_ttl,
            timeouts=Timeouts(
                connect=settings.upstream_connect_timeout,
                first_byte=settings.upstream_first_byte_timeout,
                read=settings.upstream_read_timeout,
            ),
            breaker=BreakerPolicy(
                failures=settings.upstream_breaker_failures,
                cooldown=settings.upstream_breaker_cooldown,
            ),
            verify_blobs=verify_blobs,
        )

    def endpoint(self, registry: str | None) -> Endpoint | None:
        """Where `registry` is reached, or None if shoal must not contact it."""
        return self.allowlist.endpoint(registry)

    # -- tags ------------------------------------------------------------------------------------

    async def resolve(self, ref: Reference) -> Descriptor | None:
        try:
            return await self.lookup(ref)
        except UpstreamError as exc:
            _failed(f"cannot resolve {ref.image_name} upstream", exc)
            return None

    async def lookup(self, ref: Reference) -> Descriptor | None:
        """Upstream's answer for `ref`'s tag; raises UpstreamError when there is none to be had."""
        endpoint = self.endpoint(ref.registry)
        if endpoint is None or ref.tag is None:
            return None
        key = (endpoint.registry, ref.repository, ref.tag)
        cached = self.tags.fresh(key)
        if cached is not None:
            return cached.descriptor
        task = self._inflight.get(key)
        if task is None:  # concurrent lookups of one tag share one request
            task = asyncio.ensure_future(self._ask(endpoint, ref.repository, ref.tag, key))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._settled(key, t))
        return await asyncio.shield(task)

    def last_known(self, ref: Reference) -> tuple[Descriptor, float] | None:
        """The last descriptor upstream gave for the tag and its age in seconds, if any."""
        endpoint = self.endpoint(ref.registry)
        if endpoint is None or ref.tag is None:
            return None
        answer = self.tags.last((endpoint.registry, ref.repository, ref.tag))
        if answer is None or answer.descriptor is None:
            return None
        return answer.descriptor, self.clock() - answer.at

    async def _ask(
        self, endpoint: Endpoint, repository: str, tag: str, key: TagKey
    ) -> Descriptor | None:
        try:
            async with asyncio.timeout(self.transport.timeouts.operation):
                desc = await head_tag(self.client, endpoint, repository, tag)
        except TimeoutError as exc:
            raise UpstreamUnavailable(f"resolving {repository}:{tag} timed out") from exc
        self.tags.put(key, desc)
        return desc

    def _settled(self, key: TagKey, task: asyncio.Future[Descriptor | None]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters may all have gone

    # -- content ---------------------------------------------------------------------------------

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        if kind == "manifest":
            return await self.manifest(ref, digest)
        if kind != "blob":
            return None
        endpoint = self.endpoint(ref.registry)
        if endpoint is None:
            return None
        try:
            async with asyncio.timeout(self.transport.timeouts.operation):
                size = await blob_size(self.client, endpoint, ref.repository, digest)
        except (UpstreamError, TimeoutError) as exc:
            _failed(f"upstream {kind} {digest} of {ref.repository}", exc)
            return None
        if size is None:
            return None
        return UpstreamBlob(
            self.client,
            endpoint,
            ref.repository,
            digest,
            size,
            verify=self.verify_blobs,
            resume_attempts=self.transport.retry.attempts,
            source=self.name,
        )

    async def manifest(self, ref: Reference, digest: Digest) -> MemoryBlob | None:
        """The manifest `digest`, read whole and verified, or None (also when upstream fails)."""
        endpoint = self.endpoint(ref.registry)
        if endpoint is None:
            return None
        try:
            async with asyncio.timeout(self.transport.timeouts.operation):
                fetched = await get_manifest(
                    self.client, endpoint, ref.repository, str(digest), digest
                )
        except (UpstreamError, TimeoutError) as exc:
            _failed(f"upstream manifest {digest} of {ref.repository}", exc)
            return None
        return None if fetched is None else MemoryBlob(fetched.body, self.name)

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> UpstreamSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _failed(what: str, exc: Exception) -> None:
    # An open breaker said so once already; TimeoutError here is the whole operation's deadline.
    level = logging.DEBUG if isinstance(exc, CircuitOpen) else logging.WARNING
    log.log(level, "%s: %s", what, str(exc) or type(exc).__name__)
