"""Peer request signatures and redirect capabilities: made and checked here, nowhere else.

A peer request carries `X-Shoal-Auth: v1 <sender> <unix time> <mac>`, the MAC over the method,
the path, `ns`, whether it asks this node to fetch from upstream, the sender's node ID and the
time. It is accepted within WINDOW seconds either way of this node's clock; a replay inside the
window can only repeat an idempotent GET/HEAD of content-addressed data.

A redirect capability, `shoal-cap=<expiry>.<mac>` in the URL a node sends its containerd to,
is bound to the holder's node ID, the path (repository and digest), `ns`, the fetch mark and the
expiry: it opens that one object at that one node, for CAPABILITY_LIFETIME seconds.

MACs are HMAC-SHA256 under separate keys (`keys.ClusterKey`), compared in constant time. Per
request, not per byte: the cost does not grow with the blob.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

AUTH_HEADER = "X-Shoal-Auth"
CAP_QUERY = "shoal-cap"
VERSION = "v1"
WINDOW = 60.0  # seconds a signed request stays acceptable, either way of this node's clock
CAPABILITY_LIFETIME = 60.0  # containerd follows a redirect at once, and resumes by asking again
CLOCK_SKEW = 30.0  # how far ahead another node's clock may be when it mints a capability


class Refused(Exception):
    """A request that proved nothing (401) or proved wrongly (403); `reason` is a metric label."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """What a signature or capability is bound to."""

    method: str
    path: str  # decoded, as `/v2/<repository>/<kind>/<reference>`
    ns: str | None
    fetch: bool  # the request asks the node to fetch from upstream for the cluster


def _mac(key: bytes, *fields: str) -> str:
    digest = hmac.new(key, "\n".join(fields).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _request_mac(key: bytes, target: Target, sender: str, when: int) -> str:
    return _mac(
        key, "shoal-peer-request", VERSION, target.method.upper(), target.path,
        target.ns or "", "fetch" if target.fetch else "", sender, str(when),
    )  # fmt: skip


def sign(key: bytes, target: Target, sender: str, now: float) -> str:
    """The AUTH_HEADER value for a request to a peer."""
    when = int(now)
    return f"{VERSION} {sender} {when} {_request_mac(key, target, sender, when)}"


def check_signature(key: bytes, header: str, target: Target, now: float) -> str:
    """The sender's node ID; raises Refused (403) for a bad, stale or malformed signature."""
    parts = header.split(" ")
    if len(parts) != 4 or parts[0] != VERSION or not parts[1] or not parts[2].isdigit():
        raise Refused(403, "bad_signature", "malformed peer signature")
    _, sender, when_text, mac = parts
    when = int(when_text)
    if not _same(mac, _request_mac(key, target, sender, when)):
        raise Refused(403, "bad_signature", "peer signature does not match")
    if abs(now - when) > WINDOW:
        raise Refused(403, "stale_signature", "peer signature outside the clock window")
    return sender


def _cap_mac(key: bytes, holder: str, target: Target, expiry: int) -> str:
    return _mac(
        key, "shoal-redirect-capability", VERSION, holder, target.path, target.ns or "",
        "fetch" if target.fetch else "", str(expiry),
    )  # fmt: skip


def mint_capability(
    key: bytes, holder: str, target: Target, now: float, lifetime: float = CAPABILITY_LIFETIME
) -> str:
    """The CAP_QUERY value that lets a client fetch `target.path` from `holder` until expiry."""
    expiry = int(now + lifetime)
    return f"{expiry}.{_cap_mac(key, holder, target, expiry)}"


def check_capability(
    key: bytes,
    token: str,
    holder: str,
    target: Target,
    now: float,
    lifetime: float = CAPABILITY_LIFETIME,
) -> None:
    """Raises Refused (403) unless `token` was minted for this holder, path, ns and fetch mark
    and has not expired (an expiry too far ahead counts as forged)."""
    expiry_text, dot, mac = token.partition(".")
    if not dot or not expiry_text.isdigit() or not holder:
        raise Refused(403, "bad_capability", "malformed redirect capability")
    expiry = int(expiry_text)
    if not _same(mac, _cap_mac(key, holder, target, expiry)):
        raise Refused(403, "bad_capability", "redirect capability does not match")
    if now > expiry:
        raise Refused(403, "expired_capability", "redirect capability expired")
    if expiry - now > lifetime + CLOCK_SKEW:
        raise Refused(403, "bad_capability", "redirect capability expires too late")
