"""Builds the daemon's router from its settings."""

from __future__ import annotations

from typing import Any

from shoal.routing.base import Router
from shoal.routing.options import RoutingOptions


def make_router(
    settings: Any,
    registry_port: int,
    options: RoutingOptions | None = None,
    psk: str | None = None,
) -> Router:
    """A `Libp2pRouter` configured from `shoal.config.Settings`.

    `registry_port` is the port of the registry API, the same on every node: lookups return
    `Peer(id, "<peer ip>:<registry_port>")`, and bootstrap asks peers for their ID on it.
    `psk` (hex) keys the libp2p private network unless `settings.p2p_psk` names a key file.
    """
    from shoal.routing.bootstrap import make_discovery
    from shoal.routing.libp2p.router import Libp2pRouter

    return Libp2pRouter(
        data_dir=settings.data_dir,
        registry_port=registry_port,
        p2p_listen=settings.p2p_listen,
        p2p_announce=settings.p2p_announce,
        psk_file=settings.p2p_psk,
        psk=psk,
        discovery=make_discovery(settings, registry_port),
        ready_alone=settings.ready_alone,
        options=options,
    )
