"""The cluster key: one secret every node holds, and the separate keys derived from it.

Each use gets its own key, derived with HMAC-SHA256 under a label, so a value made for one
purpose (a redirect capability) can never pass as another (a peer request signature).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

log = logging.getLogger("shoal.tenancy")

MIN_SECRET_BYTES = 32


class ClusterKey:
    def __init__(self, secret: bytes) -> None:
        secret = secret.strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a cluster key needs at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.peer_requests = self.derive("peer-request/v1")
        self.capabilities = self.derive("redirect-capability/v1")

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterKey:
        """The file's bytes, surrounding whitespace removed (a Secret's value, a random string)."""
        try:
            return cls(Path(path).read_bytes())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def derive(self, label: str) -> bytes:
        return hmac.new(self._secret, f"shoal/{label}".encode(), hashlib.sha256).digest()

    def p2p_psk(self) -> str:
        """The libp2p private-network key (64 hex digits): only nodes with the cluster key can
        connect to the DHT at all."""
        return self.derive("libp2p-psk/v1").hex()

    def __repr__(self) -> str:  # never the secret
        return "ClusterKey(…)"


def load_cluster_key(path: str) -> ClusterKey:
    """The key in `path`; without one, a random key of this node's own, so that it is alone:
    its libp2p private network admits no other node, and no peer can sign what it accepts."""
    if path:
        return ClusterKey.from_file(path)
    log.warning(
        "no --cluster-key-file: this node serves only its own containerd and joins no peers"
    )
    return ClusterKey(secrets.token_hex(32).encode())
