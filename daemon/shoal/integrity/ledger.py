"""What shoal knows about the node's own blob files, kept across restarts.

- Verified: a file identity (`identity.FileIdentity`) whose bytes shoal hashed in full and found
  matching the digest, and when. While the file keeps that identity it is sent without hashing.
- Quarantined: a digest whose file did not match, with that file's identity. It is never served
  from that file again; only a file with a new identity that hashes right lifts it (`guard`).

One JSON file in the data directory, written whole to a temporary file and renamed over the old
one, so a crash leaves either the old or the new state. A state file that cannot be read or
parsed counts as "nothing verified, nothing quarantined": the cost is hashing again, never
trusting a file unchecked. Both tables are bounded; the oldest verified entries go first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from shoal.integrity.identity import FileIdentity

log = logging.getLogger("shoal.integrity")

VERSION = 1


class Verified(NamedTuple):
    digest: str
    identity: FileIdentity
    at: float  # wall-clock seconds of the last full hash that matched


class Ledger:
    def __init__(
        self,
        path: Path | None = None,
        *,
        max_verified: int = 200_000,
        max_quarantined: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`path`: the state file (None: kept in memory only)."""
        self.path = path
        self.max_verified = max_verified
        self.max_quarantined = max_quarantined
        self.clock = clock
        self._by_identity: dict[FileIdentity, Verified] = {}
        self._by_digest: dict[str, Verified] = {}  # one file per digest: the content store's
        self._quarantined: dict[str, FileIdentity | None] = {}
        self.dirty = False
        self._load()

    # -- verified ----------------------------------------------------------------------------

    def is_verified(self, identity: FileIdentity, digest: str) -> bool:
        entry = self._by_identity.get(identity)
        return entry is not None and entry.digest == digest

    def record(self, identity: FileIdentity, digest: str, at: float | None = None) -> None:
        """The file with `identity` was hashed in full and matched `digest`."""
        self.forget(digest)
        entry = Verified(digest, identity, self.clock() if at is None else at)
        self._by_identity[identity] = entry
        self._by_digest[digest] = entry
        self.dirty = True
        if len(self._by_digest) > self.max_verified:
            oldest = min(self._by_digest.values(), key=lambda e: e.at)
            self.forget(oldest.digest)

    def forget(self, digest: str) -> None:
        entry = self._by_digest.pop(digest, None)
        if entry is not None:
            self._by_identity.pop(entry.identity, None)
            self.dirty = True

    def verified_entry(self, digest: str) -> Verified | None:
        return self._by_digest.get(digest)

    def verified(self) -> list[Verified]:
        return list(self._by_digest.values())

    def verified_bytes(self) -> int:
        return sum(e.identity.size for e in self._by_digest.values())

    # -- quarantined -------------------------------------------------------------------------

    def quarantine(self, digest: str, identity: FileIdentity | None) -> bool:
        """Records the bad file; True unless it was quarantined already (with this identity)."""
        self.forget(digest)
        if digest in self._quarantined and self._quarantined[digest] == identity:
            return False
        self._quarantined[digest] = identity
        self.dirty = True
        while len(self._quarantined) > self.max_quarantined:
            del self._quarantined[next(iter(self._quarantined))]
        return True

    def is_quarantined(self, digest: str) -> bool:
        return digest in self._quarantined

    def quarantined_identity(self, digest: str) -> FileIdentity | None:
        return self._quarantined.get(digest)

    def quarantined(self) -> list[str]:
        return list(self._quarantined)

    def lift(self, digest: str) -> None:
        if digest in self._quarantined:
            del self._quarantined[digest]
            self.dirty = True

    # -- persistence -------------------------------------------------------------------------

    def save(self) -> None:
        """Writes the state file atomically (blocking: call it from a worker thread)."""
        if self.path is None:
            self.dirty = False
            return
        self.dirty = False
        state = {
            "version": VERSION,
            "verified": [[e.digest, *e.identity, e.at] for e in self._by_digest.values()],
            "quarantined": [
                [digest, *(identity or ())] for digest, identity in self._quarantined.items()
            ],
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(state, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            self.dirty = True
            log.warning("cannot write %s: %s", self.path, exc)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            state = json.loads(self.path.read_text())
            verified, quarantined = _parse(state)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unreadable %s (%s): every file is hashed again", self.path, exc)
            return
        for entry in sorted(verified, key=lambda e: e.at)[-self.max_verified :]:
            self._by_identity[entry.identity] = entry
            self._by_digest[entry.digest] = entry
        self._quarantined = dict(list(quarantined.items())[-self.max_quarantined :])


async def keep_saved(ledger: Ledger, every: float = 10.0) -> None:
    """Writes the ledger out whenever it changed, at most once per `every` seconds; once more
    when cancelled (at shutdown)."""
    try:
        while True:
            await asyncio.sleep(every)
            if ledger.dirty:
                await asyncio.to_thread(ledger.save)
    finally:
        if ledger.dirty:
            ledger.save()


def _parse(state: Any) -> tuple[list[Verified], dict[str, FileIdentity | None]]:
    """Raises ValueError, TypeError or KeyError unless `state` is well formed, of this VERSION."""
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError("not a state of this version")
    verified = []
    for row in state["verified"]:
        digest, *ident, at = row
        verified.append(Verified(_digest(digest), _identity(ident), float(at)))
    quarantined: dict[str, FileIdentity | None] = {}
    for row in state["quarantined"]:
        digest, *ident = row
        quarantined[_digest(digest)] = _identity(ident) if ident else None
    return verified, quarantined


def _digest(value: Any) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"not a digest: {value!r}")
    return value


def _identity(values: list[Any]) -> FileIdentity:
    if len(values) != len(FileIdentity._fields) or not all(type(v) is int for v in values):
        raise ValueError(f"not a file identity: {values!r}")
    return FileIdentity(*values)
