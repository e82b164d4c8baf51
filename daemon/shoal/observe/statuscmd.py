"""`shoal status [--cluster]`: `/status.json` of this node, or of every member, as a table.

Members are the peers the node names; each is asked at its own host on the same metrics port as
this node (a DaemonSet uses the same ports everywhere). Every node is asked in parallel, each
within `--timeout`; one that does not answer is listed as unreachable. The exit status is 0 only
when every node asked answered and is ready.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

from shoal.observe.page import human_bytes

DEFAULT_ADDRESS = "127.0.0.1:30021"
COLUMNS = ("node", "address", "ready", "peers", "advertised", "served by source", "last problem")


@dataclass(frozen=True)
class Answer:
    address: str
    facts: dict[str, Any] | None
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help="this node's metrics address, host:port (as `shoal run --metrics-listen`)",
    )
    parser.add_argument("--cluster", action="store_true", help="every member the node knows")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per node")
    parser.add_argument("--json", action="store_true", help="the answers as JSON")


def fetch(address: str, timeout: float) -> Answer:
    # No proxy from the environment: these are node addresses.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}/status.json", timeout=timeout) as resp:
            facts = json.loads(resp.read(8 * 1024 * 1024))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Answer(address, None, f"unreachable: {reason}")
    if not isinstance(facts, dict) or "node" not in facts:
        return Answer(address, None, "not a shoal status answer")
    return Answer(address, facts)


def member_addresses(facts: dict[str, Any], metrics_port: str) -> list[str]:
    """The metrics addresses of the members a node names (their registry host, our port)."""
    out = []
    for peer in facts.get("peers", []):
        host = str(peer.get("address", "")).rsplit(":", 1)[0]
        if host:
            out.append(f"{host}:{metrics_port}")
    return out


def gather(address: str, cluster: bool, timeout: float) -> list[Answer]:
    first = fetch(address, timeout)
    if not cluster or first.facts is None:
        return [first]
    port = address.rsplit(":", 1)[1]
    others = [a for a in member_addresses(first.facts, port) if a != address]
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(others)))) as pool:
        rest = list(pool.map(lambda a: fetch(a, timeout), others))
    return [first, *sorted(rest, key=lambda a: a.address)]


def row(answer: Answer) -> list[str]:
    facts = answer.facts
    if facts is None:
        return ["?", answer.address, "unreachable", "", "", "", answer.error or ""]
    served = facts.get("served", {})
    parts = [f"{name} {human_bytes(n)}" for name, n in served.items() if n]
    problem = facts.get("last_problem") or {}
    return [
        str(facts["node"].get("hostname", "?")),
        answer.address,
        "yes" if facts.get("ready") else "no",
        str(len(facts.get("peers", []))),
        str(facts.get("advertised", {}).get("count", 0)),
        ", ".join(parts) or "nothing yet",
        str(problem.get("message", ""))[:80],
    ]


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        out.write("\n")


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    answers = gather(args.address, args.cluster, args.timeout)
    if args.json:
        doc = [{"address": a.address, "status": a.facts, "error": a.error} for a in answers]
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        table([list(COLUMNS), *(row(a) for a in answers)], out)
    ok = all(a.facts is not None and a.facts.get("ready") for a in answers)
    return 0 if ok else 1
