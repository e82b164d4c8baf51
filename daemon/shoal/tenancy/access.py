"""What this node may share, decided in one place (README, "Private images stay private").

An image the node holds is shareable when its registry serves it anonymously (`status`), or an
operator opted it in (`policy`). From the shareable images:

- tags: their names; manifests: their manifest digests, only under their own registry and
  repository (a request naming another repository is no proof of access to it; one naming no
  registry, as a client using shoal as its registry sends, matches the repository only);
- blobs: every digest of any shareable image. A layer of a private image that is also a layer
  of a public one is public by that image; a digest known only from private images is not
  shared, even though a public base image may have made it known outside.

Content that reached this node anonymously (fetched from upstream without credentials, or
shared by a peer, which shares only what it may) is shareable before its image record exists:
blobs for `refresh` seconds, manifests as a learned status. A blob containerd committed by
itself (its image does not exist yet) is shareable when every repository its labels may name
is (`committed_ok`): opted in, learned public, or unknown for good under `--share-unknown`.

The catalog calls `update()` on every sync; it schedules the anonymous probes of images whose
status is missing or older than `refresh`, and `on_change` asks the catalog to sync again when
a status changed, so a public image turned private is withdrawn.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from shoal import metrics
from shoal.content.model import ContentKind
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.tenancy import labels, refusals
from shoal.tenancy.policy import SharePolicy
from shoal.tenancy.status import Key, Learned, Prober, Status, StatusStore

log = logging.getLogger("shoal.tenancy")

PROBES_AT_ONCE = 4
RETRY_FIRST = 15.0  # seconds until an unknown status is asked again (doubling up to refresh)
MAX_LEARNED_BLOBS = 100_000


@dataclass(frozen=True)
class HeldImage:
    """An image record of the node and what of it the node holds."""

    registry: str
    repository: str
    name: str  # containerd's image name
    target: str  # the digest the record points at (index or manifest)
    digests: frozenset[str]  # every digest of it the node holds
    manifests: frozenset[str] = frozenset()  # the index and manifests among them
    tag: bool = False  # the name is a tag whose target the node holds: a routing key
    shared: bool | None = None  # the operator's word on the record (SHAREABLE_LABEL), if any


# An image record's label: "true" shares it (what `shoal load` sets: loading is the operator's
# act of sharing), "false" never shares it, whatever its registry answers anonymously.
SHAREABLE_LABEL = "io.shoal.shareable"


def operator_choice(image_labels: Mapping[str, str]) -> bool | None:
    value = image_labels.get(SHAREABLE_LABEL, "").strip().lower()
    return {"true": True, "false": False}.get(value)


def split_image_name(name: str) -> tuple[str, str] | None:
    """(registry, repository) of a containerd image name `host/repo:tag` or `host/repo@digest`."""
    registry, slash, rest = name.partition("/")
    if not slash or not rest:
        return None
    rest = rest.split("@", 1)[0]
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest = rest[: len(rest) - len(last)] + last.split(":", 1)[0]
    return (registry, rest) if rest else None


@dataclass
class _View:
    """The shareable part of what the node holds, as of the last sync."""

    tags: frozenset[str] = frozenset()
    manifests: frozenset[Key] = frozenset()
    unqualified: frozenset[tuple[str, str]] = frozenset()  # (repository, digest) of those
    blobs: frozenset[str] = frozenset()
    withheld: dict[str, str] = field(default_factory=dict)  # digest or tag -> refusal reason


class Access:
    def __init__(
        self,
        statuses: StatusStore,
        policy: SharePolicy,
        prober: Prober | None,
        *,
        refresh: float = 3600.0,
        on_change: Callable[[], None] = lambda: None,
        listed: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`listed`: the registries shoal may contact (whose statuses can be learned)."""
        self.statuses = statuses
        self.policy = policy
        self.prober = prober
        self.refresh = refresh
        self.on_change = on_change
        self.clock = clock
        self.listed = frozenset(listed)
        self._registries: frozenset[str] = frozenset()  # of the images held at the last sync
        self._view = _View()
        self._learned_blobs: dict[str, float] = {}  # digest -> until
        self._retry: dict[Key, tuple[float, float]] = {}  # key -> (next attempt, backoff)
        self._probing: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(PROBES_AT_ONCE)

    # -- the catalog's side -----------------------------------------------------------------------

    def update(self, images: Iterable[HeldImage]) -> set[str]:
        """Recomputes what is shareable; returns the routing keys to advertise."""
        tags: set[str] = set()
        manifests: set[Key] = set()
        blobs: set[str] = set()
        withheld: dict[str, str] = {}
        keys: set[str] = set()
        held: set[Key] = set()
        counts = dict.fromkeys(Status, 0)
        for image in images:
            key = (image.registry, image.repository, image.target)
            held.add(key)
            learned = self.statuses.get(key)
            status = learned.status if learned is not None else Status.UNKNOWN
            if image.shared is False:
                status = Status.PRIVATE  # the operator said so: nothing to ask a registry
            counts[status] += 1
            if image.shared is None:
                self._probe_if_due(key, learned)
            shares = image.shared is True
            if not shares and not self.policy.shares(status, image.registry, image.repository):
                reason = refusals.PRIVATE if status is Status.PRIVATE else refusals.UNKNOWN
                for digest in image.digests | ({image.name} if image.tag else set()):
                    if withheld.get(digest) != refusals.PRIVATE:
                        withheld[digest] = reason
                continue
            blobs |= image.digests
            manifests |= {(image.registry, image.repository, d) for d in image.manifests}
            keys |= image.digests
            if image.tag:
                tags.add(image.name)
                keys.add(image.name)
        for shared in blobs | tags:
            withheld.pop(shared, None)
        unqualified = frozenset((repo, digest) for _, repo, digest in manifests)
        self._view = _View(
            frozenset(tags), frozenset(manifests), unqualified, frozenset(blobs), withheld
        )
        self._registries = frozenset(k[0] for k in held)
        for status, count in counts.items():
            metrics.CONTENT_STATUS.labels(status.value).set(count)
        self._retry = {k: v for k, v in self._retry.items() if k in held}
        self.statuses.prune(held, younger_than=2 * self.refresh)
        self.statuses.save()
        return keys

    def _probe_if_due(self, key: Key, learned: Learned | None) -> None:
        if self.prober is None or key in self._probing:
            return
        now = self.clock()
        retry = self._retry.get(key)
        if retry is not None and retry[0] > now:
            return  # the last attempt learned nothing: wait out its backoff
        if learned is not None and now - learned.at < self.refresh * _jitter(key):
            return
        self._probing.add(key)
        task = asyncio.ensure_future(self._probe(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, key: Key) -> None:
        assert self.prober is not None
        try:
            async with self._slots:
                status = await self.prober.probe(key)
        except Exception as exc:  # a probe must never take the catalog down
            log.warning("probe failed: %r", exc)
            status = Status.UNKNOWN
        finally:
            self._probing.discard(key)
        if status is Status.UNKNOWN:
            backoff = min(self.refresh, 2 * self._retry.get(key, (0.0, RETRY_FIRST / 2))[1])
            self._retry[key] = (self.clock() + backoff, backoff)
            return
        self._retry.pop(key, None)
        changed = self.statuses.put(key, status, "probe")
        self.statuses.save()
        if changed:
            log.info("learned that %s serves %s %s", key[0], key[1], status.value)
            self.on_change()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the request path -------------------------------------------------------------------------

    def tag_ok(self, image_name: str) -> bool:
        return image_name in self._view.tags

    def manifest_ok(self, registry: str | None, repository: str, digest: Digest) -> bool:
        if registry is None:
            return (repository, str(digest)) in self._view.unqualified
        return (registry, repository, str(digest)) in self._view.manifests

    def blob_ok(self, digest: Digest | str) -> bool:
        text = str(digest)
        if text in self._view.blobs:
            return True
        until = self._learned_blobs.get(text)
        return until is not None and until > self.clock()

    def committed_ok(self, content_labels: Mapping[str, str]) -> bool:
        """Whether a blob containerd pulled by itself may be shared, by where its labels say
        it came from. Not yet learned is not shareable: its image will be asked about."""
        known = self._registries | self.listed | self.statuses.registries()
        known |= {p for p in self.policy.registries if "*" not in p and "?" not in p}
        pairs = labels.sources(content_labels, known)
        return bool(pairs) and all(self._repository_ok(r, repo) for r, repo in pairs)

    def _repository_ok(self, registry: str, repository: str) -> bool:
        if self.policy.opted_in(registry, repository):
            return True
        status = self.statuses.repository(registry, repository)
        if status is Status.PUBLIC:
            return True
        # Unknown for good (never asked: not allow-listed) is the only unknown to share.
        return status is Status.UNKNOWN and self.policy.unknown and registry not in self.listed

    def withheld(self, digest_or_tag: str) -> str | None:
        """Why the node does not share content it holds (a refusal reason), or None when it
        does not hold it at all."""
        return self._view.withheld.get(digest_or_tag)

    def learned(self, ref: Reference, digest: Digest, kind: ContentKind, how: str) -> None:
        """Content reached this node anonymously (`how`: "upstream" or "peer")."""
        if kind == "blob":
            if len(self._learned_blobs) >= MAX_LEARNED_BLOBS:
                now = self.clock()
                self._learned_blobs = {d: t for d, t in self._learned_blobs.items() if t > now}
                while len(self._learned_blobs) >= MAX_LEARNED_BLOBS:
                    del self._learned_blobs[next(iter(self._learned_blobs))]
            self._learned_blobs[str(digest)] = self.clock() + self.refresh
            return
        if ref.registry is None:
            return
        key = (ref.registry, ref.repository, str(digest))
        old = self.statuses.get(key)
        if how == "peer" and old is not None:
            return  # the registry's own answer outweighs a peer's view, and is refreshed anyway
        if self.statuses.put(key, Status.PUBLIC, how):
            self.on_change()


def _jitter(key: Key) -> float:
    """0.9 to 1.1, fixed per key: refreshes of many images spread out instead of coming at once."""
    return 0.9 + 0.2 * hashlib.sha256("/".join(key).encode()).digest()[0] / 255
