"""Answering registry challenges: Bearer tokens (cached per registry and scope) and Basic.

Credentials belong to one registry name. They are sent to that registry's own origin, and, as
Basic credentials for a token, to the realm the registry itself declared in its challenge —
never to a realm over plain HTTP when the registry is HTTPS, and never to redirect targets (the
transport attaches a ScopedAuth to its one origin only).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable

from yarl import URL

from shoal.upstream.allowlist import Endpoint, origin
from shoal.upstream.challenge import Challenge, parse_challenges, pick
from shoal.upstream.credentials import Credentials, UserPass
from shoal.upstream.errors import UpstreamDenied, UpstreamInvalid
from shoal.upstream.transport import ScopedAuth, Transport, read_limited

log = logging.getLogger("shoal.upstream")

DEFAULT_TOKEN_TTL = 60.0  # the token spec's default when `expires_in` is absent
MAX_TOKEN_RESPONSE = 1024 * 1024
_MAX_CACHED = 1024

TokenKey = tuple[str, str, int]  # registry, scope, credentials generation


def basic(creds: UserPass) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def token_lifetime(expires_in: object) -> float:
    """Seconds to use a token for: its lifetime minus slack for clock skew and transit."""
    ttl = DEFAULT_TOKEN_TTL
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        ttl = float(expires_in)
    return ttl - min(10.0, ttl / 10)


class Authenticator:
    def __init__(
        self,
        transport: Transport,
        credentials: Credentials,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.credentials = credentials
        self.clock = clock
        self._tokens: dict[TokenKey, tuple[str, float]] = {}
        self._locks: dict[TokenKey, asyncio.Lock] = {}
        self._challenges: dict[str, Challenge] = {}  # the last challenge of each registry
        self.token_fetches = 0  # for metrics and tests

    async def authorization(self, endpoint: Endpoint, scope: str) -> ScopedAuth | None:
        """What to send on a first attempt: nothing until the registry has challenged once,
        then a cached (or fetched up front) token, or Basic — saving a 401 round trip."""
        challenge = self._challenges.get(endpoint.registry)
        if challenge is None:
            return None
        return await self._answer(endpoint, challenge, scope, rejected=None)

    async def on_challenge(
        self,
        endpoint: Endpoint,
        scope: str,
        headers: list[str],
        rejected: ScopedAuth | None,
    ) -> ScopedAuth | None:
        """Authorization answering a 401's `WWW-Authenticate`, or None if there is none."""
        creds = self.credentials.lookup(endpoint.registry)
        challenge = pick(parse_challenges(headers), creds is not None)
        if challenge is None:
            return None
        self._challenges[endpoint.registry] = challenge
        return await self._answer(endpoint, challenge, scope, rejected)

    async def _answer(
        self, endpoint: Endpoint, challenge: Challenge, scope: str, rejected: ScopedAuth | None
    ) -> ScopedAuth | None:
        creds = self.credentials.lookup(endpoint.registry)
        if challenge.scheme == "basic":
            if creds is None:
                return None
            answer = ScopedAuth(endpoint.origin, basic(creds))
            return None if answer == rejected else answer
        key = (endpoint.registry, scope, self.credentials.generation)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # concurrent requests for one scope share one token fetch
            cached = self._tokens.get(key)
            if cached and rejected and rejected.header == _bearer(cached[0]):
                del self._tokens[key]  # the registry refused it: expired or revoked early
                cached = None
            if cached is None or cached[1] <= self.clock():
                token, lifetime = await self._fetch_token(endpoint, challenge, scope, creds)
                cached = (token, self.clock() + lifetime)
                self._store(key, cached)
        return ScopedAuth(endpoint.origin, _bearer(cached[0]))

    async def _fetch_token(
        self, endpoint: Endpoint, challenge: Challenge, scope: str, creds: UserPass | None
    ) -> tuple[str, float]:
        realm = _realm_url(challenge)
        query = dict(realm.query)
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        query["scope"] = scope
        url = realm.with_query(query)
        auth = None
        if creds is not None:
            if realm.scheme == "http" and endpoint.base.scheme == "https":
                log.warning("plain-HTTP token realm of %s: asking anonymously", endpoint.registry)
            else:
                auth = ScopedAuth(origin(realm), basic(creds))
        self.token_fetches += 1
        resp = await self.transport.send("GET", url, auth=auth)
        try:
            if resp.status in (401, 403):
                raise UpstreamDenied(f"token for {scope} at {endpoint.registry}: {resp.status}")
            if resp.status != 200:
                raise UpstreamInvalid(f"token endpoint of {endpoint.registry}: {resp.status}")
            body = await read_limited(resp, MAX_TOKEN_RESPONSE)
        finally:
            resp.release()
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise UpstreamInvalid(f"token endpoint of {endpoint.registry}: not JSON") from exc
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token or not token.isprintable():
            raise UpstreamInvalid(f"token endpoint of {endpoint.registry}: no token")
        return token, token_lifetime(doc.get("expires_in"))

    def _store(self, key: TokenKey, value: tuple[str, float]) -> None:
        # Clients choose repository names, so scopes are unbounded: so must the cache not be.
        if len(self._tokens) >= _MAX_CACHED:
            now = self.clock()
            for stale in [k for k, (_, exp) in self._tokens.items() if exp <= now]:
                del self._tokens[stale]
            while len(self._tokens) >= _MAX_CACHED:
                del self._tokens[next(iter(self._tokens))]
        if len(self._locks) >= 2 * _MAX_CACHED:
            for idle in [k for k, lock in self._locks.items() if not lock.locked()]:
                if idle not in self._tokens:
                    del self._locks[idle]
        self._tokens[key] = value


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _realm_url(challenge: Challenge) -> URL:
    try:
        realm = URL(challenge.realm or "")
    except ValueError as exc:
        raise UpstreamInvalid("bad token realm") from exc
    if realm.scheme not in ("http", "https") or not realm.host or realm.user:
        raise UpstreamInvalid("bad token realm")
    return realm
