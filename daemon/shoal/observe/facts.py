"""The facts of one node, as `/status.json` serves them and `/status` and `shoal status` show them.

The daemon hands in plain callables (`NodeParts`), so this module knows nothing of how the parts
are wired, and tests build it from fakes. The daemon feeds the hooks: refusals from
`shoal.tenancy.refusals`, quarantined digests from `shoal.integrity`'s record, preheats from the
keeper; a hook left out answers an empty list.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from shoal import __version__
from shoal.observe.recorder import SERIES, LastProblem, Recorder
from shoal.routing.base import NodeInfo, Peer

ADVERTISED_SAMPLE = 20
FORMAT = 1  # bumped when a field changes meaning; `shoal status` reads older nodes' answers


def _nothing() -> list[dict[str, Any]]:
    return []


@dataclass
class NodeParts:
    ready: Callable[[], bool]
    checks: Callable[[], dict[str, bool]]  # what readiness is made of
    node_info: Callable[[], NodeInfo]
    members: Callable[[], list[Peer]]
    advertised: Callable[[], Collection[str]]
    listen: str  # registry API address (host:port)
    metrics_listen: str
    containerd_version: Callable[[], str]
    namespace: str
    recorder: Recorder
    problems: LastProblem | None = None
    quarantined: Callable[[], list[dict[str, Any]]] = _nothing  # {digest, reason, at}
    preheats: Callable[[], list[dict[str, Any]]] = _nothing  # shoal.preheat.keeper
    hostname: str = field(default_factory=socket.gethostname)


def status(parts: NodeParts, pulls: int = 50) -> dict[str, Any]:
    rec = parts.recorder
    info = parts.node_info()
    advertised = parts.advertised()
    sample = sorted(advertised)[:ADVERTISED_SAMPLE] if len(advertised) < 10_000 else []
    return {
        "format": FORMAT,
        "time": rec.clock(),
        "node": {
            "hostname": parts.hostname,
            "peer_id": info.id,
            "addrs": list(info.addrs),
            "listen": parts.listen,
            "metrics_listen": parts.metrics_listen,
            "version": __version__,
            "containerd": parts.containerd_version(),
            "namespace": parts.namespace,
            "started": rec.started,
            "uptime": max(0.0, time.time() - rec.started),
        },
        "ready": parts.ready(),
        "checks": parts.checks(),
        "peers": [{"id": p.id, "address": p.address} for p in parts.members()],
        "advertised": {"count": len(advertised), "sample": sample},
        "served": {name: rec.totals[name] for name in SERIES},
        "pulls": [p.to_json() for p in rec.recent(pulls)],
        "refusals": {
            "counts": dict(rec.refusal_counts),
            "recent": [
                {"at": r.at, "reason": r.reason, "what": r.what} for r in reversed(rec.refusals)
            ],
        },
        "quarantined": parts.quarantined(),
        "preheats": parts.preheats(),
        "bytes_by_minute": rec.by_minute(),
        "last_problem": parts.problems.to_json() if parts.problems else None,
    }
