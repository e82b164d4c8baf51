"""`shoal preheat <image reference> [--replicas N]`: asks this node's shoal to have the image
kept on N nodes, then follows their progress (each holder's `/status.json`) until every copy is
kept, and prints where the copies are. Exit status 0 when all N are kept."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

from shoal.observe.page import human_bytes
from shoal.observe.statuscmd import DEFAULT_ADDRESS, fetch
from shoal.preheat.admin import ADMIN_PATH

DONE = ("kept", "pulled")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="the image, e.g. registry.example/team/app:v1")
    parser.add_argument("--replicas", type=int, default=2, help="nodes that keep a copy")
    parser.add_argument(
        "--ttl", type=float, default=3600.0,
        help="seconds copies are kept if no kubelet pulls the image (default 1 h, at most 24 h)",
    )  # fmt: skip
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="this node's metrics address")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for copies")
    parser.add_argument("--no-wait", action="store_true", help="start, and do not follow")


def _start(args: argparse.Namespace) -> dict[str, Any]:
    body = json.dumps({"ref": args.reference, "replicas": args.replicas, "ttl": args.ttl})
    request = urllib.request.Request(
        f"http://{args.address}{ADMIN_PATH}", data=body.encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
    except urllib.error.HTTPError as err:
        try:
            reason = json.loads(err.read()).get("error", err.reason)
        except ValueError:
            reason = err.reason
        raise SystemExit(f"shoal preheat: {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"shoal preheat: cannot reach shoal at {args.address}: {exc}") from None


def _state(metrics: str, manifest: str, timeout: float) -> dict[str, Any] | None:
    answer = fetch(metrics, timeout)
    for job in (answer.facts or {}).get("preheats", []):
        if job.get("manifest") == manifest:
            return dict(job)
    return None


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    started = _start(args)
    manifest = started["manifest"]
    port = args.address.rsplit(":", 1)[1]
    holders = started["holders"]
    out.write(f"preheating {started['ref']} ({manifest}) on {len(holders)} of the "
              f"{args.replicas} nodes asked\n")  # fmt: skip
    metrics = {h["address"]: f"{h['address'].rsplit(':', 1)[0]}:{port}" for h in holders}
    states: dict[str, dict[str, Any]] = {
        h["address"]: {"state": "failed", "error": h["error"]} for h in holders if h.get("error")
    }
    deadline = time.monotonic() + args.timeout
    while not args.no_wait:
        for h in holders:
            if h["address"] in states and states[h["address"]].get("state") in ("failed", *DONE):
                continue
            job = _state(metrics[h["address"]], manifest, 5.0)
            if job is not None:
                states[h["address"]] = job
        line = ", ".join(
            f"{a}: {s.get('state', '?')} {human_bytes(s.get('bytes_done', 0))}"
            for a, s in sorted(states.items())
        )
        out.write(f"  {line}\n")
        out.flush()
        over = len(states) == len(holders) and all(
            s.get("state") in ("failed", "expired", *DONE) for s in states.values()
        )
        if over or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    out.write("copies:\n")
    kept = 0
    for h in holders:
        s = states.get(h["address"], {"state": "unknown"})
        kept += s.get("state") in DONE
        error = f"  {s['error']}" if s.get("error") else ""
        out.write(f"  {h['address']:24} {h['id'][:20]:20} {s.get('state')}{error}\n")
    return 0 if kept == len(holders) == args.replicas or (args.no_wait and not states) else 1
