"""Relay or redirect: how a blob body another node holds reaches this node's containerd.

The one place this is decided (README, "Peers"). Redirected, containerd downloads from the
holder itself: the bytes cross this node's CPU once, in containerd (which verifies them too),
instead of three times (received, hashed and sent again here); the holder verifies what it
sends. Relayed, this node streams and verifies the body, and resumes it from the next holder
if one fails. Small bodies are always relayed: cheaper than a second connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.registry.protocol import Asker


@dataclass(frozen=True)
class PeerTransfer:
    redirect: bool = True  # `--peer-transfer redirect`
    redirect_min: int = 1024 * 1024  # smaller bodies are relayed
    relay_timeout: float = 5.0  # a relaying node gives up on a peer silent for this long

    def redirects(self, size: int, asker: Asker) -> bool:
        """Whether containerd is sent (307) to the node holding a blob of `size` bytes. Only
        containerd's own requests are: a peer's is answered from what this node holds."""
        return asker is Asker.CONTAINERD and self.redirect and size >= self.redirect_min

    def longest_silence(self) -> float | None:
        """How long bytes other nodes wait for may stay silent (None: as long as needed). Nodes
        relay blobs under `redirect_min`, and all of them without `redirect`, and give up on a
        peer silent for `relay_timeout`; redirected containerd waits as long as it takes."""
        return None if self.redirect else self.relay_timeout * 0.8
