"""Relay or redirect: how a blob body another node holds reaches this node's containerd.

The one place this is decided (README, "Peers"). Relayed (the default), this node downloads the
blob into its own spool (`shoal.sources.spooled`), every holder under a progress deadline, and
containerd reads it from here as it lands: containerd's connection never goes silent because a
holder stopped, and bytes that fail verification restart from byte 0 elsewhere. Redirected,
containerd downloads from the holder itself: the bytes cross this node's CPU once, in
containerd, instead of three times, but containerd waits on a holder that goes silent with no
deadline, which shoal cannot protect. Small bodies are always relayed: cheaper than a second
connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from shoal.oci.digest import Digest
from shoal.registry.protocol import Asker

_FROM = re.compile(r"^\s*bytes\s*=\s*(\d+)\s*-")


class Asked(Protocol):
    """Told where containerd starts each download (shoal.sources.holders.Holders): from 0 soon
    after a redirect means the holder's bytes did not match."""

    def asked(self, digest: str, start: int) -> None: ...


@dataclass(frozen=True)
class PeerTransfer:
    redirect: bool = False  # `--peer-transfer redirect`
    redirect_min: int = 1024 * 1024  # smaller bodies are relayed
    asked: Asked | None = None

    def redirects(self, size: int, asker: Asker) -> bool:
        """Whether containerd is sent (307) to the node holding a blob of `size` bytes. Only
        containerd's own requests are: a peer's is answered from what this node holds."""
        return asker is Asker.CONTAINERD and self.redirect and size >= self.redirect_min

    def asking(self, digest: Digest, range_header: str | None, asker: Asker) -> None:
        """containerd asks for `digest` (with `range_header`), before any source is asked."""
        if self.asked is None or not self.redirect or asker is not Asker.CONTAINERD:
            return
        match = _FROM.match(range_header) if range_header else None
        self.asked.asked(str(digest), int(match.group(1)) if match else 0)
