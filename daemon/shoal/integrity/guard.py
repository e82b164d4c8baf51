"""The one place that decides whether one of the node's own blob files may be served, and what a
file that does not match its digest costs: quarantine.

A quarantined digest is withdrawn from the DHT at once and kept out of the catalog's
advertisements, every request for it is a miss (404: containerd and peers go elsewhere), and it
is counted and logged once. It is lifted only by a file of a new identity that hashes right,
e.g. after the image was removed and pulled again: a request or the scrub that meets such a file
hashes it in the background (never while serving it), and the digest is served and advertised
again once it matched. The same file can never lift its own quarantine, even if a later read of
it hashes right: a disk that returns wrong bytes once may do so again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, Protocol

from shoal import metrics
from shoal.integrity.files import CheckedFile, SharedHashes, hash_whole
from shoal.integrity.identity import FileIdentity, identity_of
from shoal.integrity.ledger import Ledger
from shoal.oci.digest import Digest

log = logging.getLogger("shoal.integrity")


class Advertised(Protocol):
    """What quarantine needs of the node's advertisements (shoal.catalog.Catalog)."""

    async def exclude(self, key: str) -> None:
        """Withdraw `key` now and never advertise it until `include`."""
        ...

    def include(self, key: str) -> None: ...


class Integrity:
    def __init__(self, ledger: Ledger | None = None, advertised: Advertised | None = None) -> None:
        self.ledger = ledger or Ledger()
        self.advertised = advertised
        self.hashes = SharedHashes()
        self.active = 0  # local files being sent right now (the scrub yields to them)
        self._rechecks: dict[str, asyncio.Future[None]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        metrics.QUARANTINED_DIGESTS.set(len(self.ledger.quarantined()))

    # -- asked by the local source and the blob server ---------------------------------------

    async def blocks(self, digest: Digest, path: str | None, size: int) -> bool:
        """Whether the node's copy of `digest` (`size` bytes at `path`) must not be served."""
        key = str(digest)
        if self.ledger.is_quarantined(key):
            if path is not None:
                self._recheck_soon(digest, path)
            return True
        recorded = self.ledger.verified_entry(key)
        if recorded is not None and recorded.identity.size != size:
            # Same digest, other length: wrong without hashing a byte.
            self.mismatch(digest, await asyncio.to_thread(identity_of, path) if path else None,
                          "size")  # fmt: skip
            return True
        return False

    def file(self, path: str, digest: Digest, size: int) -> CheckedFile:
        return CheckedFile(path, digest, size, self)

    def is_verified(self, identity: FileIdentity, digest: Digest) -> bool:
        return self.ledger.is_verified(identity, str(digest))

    async def check(self, fd: int, identity: FileIdentity, digest: Digest) -> bool:
        """Hashes the whole file (one pass shared by concurrent requests): recorded as verified
        when it matched and did not change meanwhile, quarantined when it did not match."""
        ok = await self.hashes.matches(fd, identity, digest)
        if not ok:
            self.mismatch(digest, identity, "serving")
        elif FileIdentity.of(os.fstat(fd)) == identity and not self.ledger.is_quarantined(
            str(digest)
        ):
            self.ledger.record(identity, str(digest))
            metrics.VERIFIED_FILES.set(len(self.ledger.verified()))
        return ok

    def sending(self, delta: int) -> None:
        self.active += delta

    def mismatch(self, digest: Digest, identity: FileIdentity | None, found_by: str) -> None:
        """The node's file of `digest` (with `identity`, when known) does not match: quarantine."""
        if not self.ledger.quarantine(str(digest), identity):
            return
        metrics.QUARANTINED.labels(found_by).inc()
        metrics.QUARANTINED_DIGESTS.set(len(self.ledger.quarantined()))
        metrics.VERIFIED_FILES.set(len(self.ledger.verified()))
        log.warning(
            "quarantined %s: the node's copy does not match its digest (found by %s); "
            "withdrawn, and not served again until containerd holds a copy that matches",
            digest, found_by,
        )  # fmt: skip
        if self.advertised is not None:
            self.background(self.advertised.exclude(str(digest)))

    # -- lifting -----------------------------------------------------------------------------

    def _recheck_soon(self, digest: Digest, path: str) -> None:
        key = str(digest)
        if key not in self._rechecks:
            task = asyncio.ensure_future(self.recheck(digest, path))
            self._rechecks[key] = task
            task.add_done_callback(lambda _: self._rechecks.pop(key, None))

    async def recheck(self, digest: Digest, path: str) -> None:
        """Lifts the quarantine of `digest` if the file at `path` is a new one that matches."""
        key = str(digest)
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.lift(digest, None)  # nothing left to serve wrongly; a new copy is hashed anew
            return
        except OSError:
            return
        try:
            identity = FileIdentity.of(os.fstat(fd))
            bad = self.ledger.quarantined_identity(key)
            if identity == bad:
                return  # the bad file itself
            ok = await asyncio.to_thread(hash_whole, os.dup(fd), digest, identity.size)
            changed = FileIdentity.of(os.fstat(fd)) != identity
        finally:
            os.close(fd)
        if changed or not self.ledger.is_quarantined(key):
            return
        if not ok:
            self.ledger.quarantine(key, identity)  # still quarantined, now by this file
            if bad is not None:
                log.warning("%s: the node's new copy does not match either; still quarantined",
                            key)  # fmt: skip
            return
        self.lift(digest, identity)

    def lift(self, digest: Digest, identity: FileIdentity | None) -> None:
        """A file with `identity` matched `digest` (None: the bad file is gone): served and
        advertised again once the node holds it."""
        key = str(digest)
        self.ledger.lift(key)
        metrics.QUARANTINED_DIGESTS.set(len(self.ledger.quarantined()))
        if identity is not None:
            self.ledger.record(identity, key)
            log.info("quarantine of %s lifted: the node holds a new copy that matches", key)
        if self.advertised is not None:
            self.advertised.include(key)

    # -- housekeeping ------------------------------------------------------------------------

    def background(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        tasks = [*self._background, *self._rechecks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
