"""Upstream credentials from a docker `config.json`-style file, re-read when it changes.

The file is usually a mounted Secret: kubelet swaps it in place, so its stat is checked (at most
once per `check_interval`) and a change reloads it. A file that fails to parse keeps the last good
credentials (a half-written update must not log shoal out); a removed file means none.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from shoal.oci.errors import NameInvalid
from shoal.oci.names import parse_registry_host

log = logging.getLogger("shoal.upstream")

UserPass = tuple[str, str]


def registry_key(key: str) -> str | None:
    """`https://index.docker.io/v1/`, `ghcr.io`, `host:5000/` → the registry name, or None."""
    text = key.strip()
    for prefix in ("https://", "http://"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
    text = text.split("/", 1)[0]
    try:
        return parse_registry_host(text)
    except NameInvalid:
        return None


def _entry(value: Any) -> UserPass | None:
    if not isinstance(value, dict):
        return None
    auth = value.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return (user, password) if sep and user else None
    name, secret = value.get("username"), value.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return name, secret
    return None  # identity/registry tokens (OAuth refresh) are not supported


def parse_config(data: bytes) -> dict[str, UserPass]:
    """The `auths` section by registry name; raises ValueError when it is not such a file."""
    doc = json.loads(data)
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise ValueError("no 'auths' object")
    out: dict[str, UserPass] = {}
    for key, value in auths.items():
        name = registry_key(str(key))
        creds = _entry(value)
        if name is not None and creds is not None:
            out[name] = creds
    return out


class Credentials:
    def __init__(
        self,
        path: str | None,
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path or None
        self.check_interval = check_interval
        self.clock = clock
        self.generation = 0  # bumped on every change; cached tokens are keyed by it
        self._auths: dict[str, UserPass] = {}
        self._stat: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._refresh()

    def lookup(self, registry: str) -> UserPass | None:
        """The user and password for exactly this registry name, if any."""
        now = self.clock()
        if now - self._checked >= self.check_interval:
            self._refresh()
        return self._auths.get(registry)

    def _refresh(self) -> None:
        self._checked = self.clock()
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stat is not None or self._auths:
                log.warning("credentials file %s is gone; using none", self.path)
                self._set({}, None)
            return
        except OSError as exc:
            log.warning("cannot stat credentials file %s: %s", self.path, exc)
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._stat:
            return
        try:
            with open(self.path, "rb") as fobj:
                auths = parse_config(fobj.read())
        except (OSError, ValueError) as exc:
            log.warning("credentials file %s unreadable, keeping the last good: %s", self.path, exc)
            self._stat = key  # warn once per change, not on every check
            return
        log.info("loaded upstream credentials for %d registries", len(auths))
        self._set(auths, key)

    def _set(self, auths: dict[str, UserPass], key: tuple[int, int, int] | None) -> None:
        self._auths, self._stat = auths, key
        self.generation += 1
