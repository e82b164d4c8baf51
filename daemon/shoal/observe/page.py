"""`/status`: the facts of `/status.json` as one self-contained HTML page (inline CSS, the chart
as server-drawn SVG, no script, no external asset), refreshed by the browser every few seconds."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from shoal.observe.recorder import SERIES

REFRESH_SECONDS = 5
COLOURS = {
    "local": "#2f7d4f",
    "inflight": "#8c6bb1",
    "peer": "#2b6cb0",
    "upstream": "#c05621",
    "to_peers": "#718096",
}
LABELS = {
    "local": "local",
    "inflight": "in flight",
    "peer": "peer",
    "upstream": "upstream",
    "to_peers": "served to peers",
}

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
margin:0;background:#f5f6f8;color:#1a202c}
header{background:#1a365d;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:16px}
header h1{font-size:20px;margin:0;font-weight:600}
header .id{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;opacity:.8}
main{padding:16px 24px;display:grid;gap:16px;
grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
section{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:12px 16px;
min-width:0}
td{overflow-wrap:anywhere}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 8px;color:#2d3748}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 8px 3px 0;border-bottom:1px solid #edf2f7;vertical-align:top}
th{color:#4a5568;font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;
word-break:break-all}
ul{margin:0;padding-left:18px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff}
.ready{background:#2f855a}.notready{background:#c53030}
.src{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#f7fafc;border:1px solid #e2e8f0;border-radius:4px;padding:6px 12px;min-width:90px}
.card b{display:block;font-size:18px}
.legend span{margin-right:12px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:-1px}
.empty{color:#718096;font-style:italic}
.problem{color:#9b2c2c}
"""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns at GiB


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _source(name: str) -> str:
    if not name:
        return '<span class="empty">—</span>'
    colour = COLOURS.get(name, "#4a5568")
    return f'<span class="src" style="background:{colour}">{escape(LABELS.get(name, name))}</span>'


def _table(headers: Sequence[str], rows: Iterable[str], empty: str) -> str:
    body = "".join(rows)
    if not body:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def chart(minutes: Sequence[dict[str, int]], width: int = 960, height: int = 180) -> str:
    """Stacked bars of bytes per minute by source over the last hour, as inline SVG. Bytes served
    to peers are drawn as a line: they are part of the sources' bars, not in addition."""
    stacked = [s for s in SERIES if s != "to_peers"]
    top = max([sum(m[s] for s in stacked) for m in minutes] + [m["to_peers"] for m in minutes])
    left, bottom = 64, 18
    plot_w, plot_h = width - left - 8, height - bottom - 8
    slot = plot_w / max(1, len(minutes))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" style="max-width:{width}px" role="img" '
        'aria-label="bytes by source per minute, last hour">',
        f'<line x1="{left}" y1="{8 + plot_h}" x2="{width - 8}" y2="{8 + plot_h}" '
        'stroke="#a0aec0"/>',
        f'<text x="{left - 6}" y="14" font-size="11" text-anchor="end">'
        f"{escape(human_bytes(top))}</text>",
        f'<text x="{left - 6}" y="{8 + plot_h}" font-size="11" text-anchor="end">0</text>',
        f'<text x="{left}" y="{height - 2}" font-size="11">-60 min</text>',
        f'<text x="{width - 8}" y="{height - 2}" font-size="11" text-anchor="end">now</text>',
    ]
    line: list[str] = []
    for i, minute in enumerate(minutes):
        x = left + i * slot
        y = float(8 + plot_h)
        for name in stacked:
            value = minute[name]
            if not value or not top:
                continue
            h = max(1.0, plot_h * value / top)
            y -= h
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(1.0, slot - 2):.1f}" '
                f'height="{h:.1f}" fill="{COLOURS[name]}"><title>{escape(LABELS[name])}: '
                f"{escape(human_bytes(value))}</title></rect>"
            )
        if top:
            ty = 8 + plot_h - plot_h * minute["to_peers"] / top
            line.append(f"{x + slot / 2:.1f},{ty:.1f}")
    if top and any(m["to_peers"] for m in minutes):
        parts.append(
            f'<polyline points="{" ".join(line)}" fill="none" stroke="{COLOURS["to_peers"]}" '
            'stroke-width="2" stroke-dasharray="4 2"/>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span><i style="background:{COLOURS[s]}"></i>{escape(LABELS[s])}</span>' for s in SERIES
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _pull_row(p: dict[str, Any]) -> str:
    what = p["reference"]
    shown = what if not what.startswith("sha256:") else what[:19] + "…"
    if p.get("peer"):
        peer = "from " + escape(p["peer"])
    elif p["asker"] != "containerd" and p.get("client"):
        peer = "to " + escape(p["client"])
    else:
        peer = ""
    how = " (redirect)" if p.get("redirected") else ""
    cut = " cut off" if not p.get("complete", True) else ""
    return (
        f'<tr class="pull" data-source="{escape(p["source"])}" data-asker="{escape(p["asker"])}">'
        f"<td>{_clock(p['at'])}</td><td>{escape(p['method'])} {escape(p['kind'])}</td>"
        f'<td class="mono" title="{escape(what)}">{escape(p["repository"])}'
        f"{'@' if what.startswith('sha256:') else ':'}{escape(shown)}</td>"
        f'<td class="num">{escape(human_bytes(p["bytes"]))}</td>'
        f'<td>{_source(p["source"])}{escape(how)}</td><td class="mono">{peer}</td>'
        f"<td>{escape(p['asker'])}</td><td>{p['status']}{escape(cut)}</td>"
        f'<td class="num">{p["seconds"] * 1000:.0f} ms</td></tr>'
    )


def render(facts: dict[str, Any]) -> str:
    node = facts["node"]
    ready = facts["ready"]
    badge = (
        '<span class="badge ready" id="readiness">ready</span>'
        if ready
        else '<span class="badge notready" id="readiness">not ready</span>'
    )
    checks = ", ".join(f"{escape(k)} {'✓' if v else '✗'}" for k, v in facts["checks"].items())
    served = facts["served"]
    cards = "".join(
        f'<div class="card" data-series="{s}">{escape(LABELS[s])}'
        f"<b>{escape(human_bytes(served.get(s, 0)))}</b></div>"
        for s in SERIES
    )
    peers = _table(
        ("peer id", "address"),
        (
            f'<tr><td class="mono">{escape(p["id"])}</td><td class="mono">{escape(p["address"])}'
            "</td></tr>"
            for p in facts["peers"]
        ),
        "no peers known",
    )
    pulls = _table(
        ("time", "what", "reference", "bytes", "source", "peer", "asked by", "status", "took"),
        (_pull_row(p) for p in facts["pulls"]),
        "no pulls yet",
    )
    adv = facts["advertised"]
    sample = "".join(f"<li><code>{escape(k)}</code></li>" for k in adv["sample"])
    refusals = facts["refusals"]
    refusal_rows = _table(
        ("time", "reason", "what"),
        (
            f"<tr><td>{_clock(r['at'])}</td><td>{escape(r['reason'])}</td>"
            f"<td>{escape(r['what'])}</td></tr>"
            for r in refusals["recent"]
        ),
        "no refusals",
    )
    counts = ", ".join(f"{escape(k)}: {v}" for k, v in sorted(refusals["counts"].items()))
    quarantined = _table(
        ("digest", "reason", "since"),
        (
            f'<tr><td class="mono">{escape(str(q.get("digest", "")))}</td>'
            f"<td>{escape(str(q.get('reason', '')))}</td>"
            f"<td>{_clock(q['at']) if q.get('at') else ''}</td></tr>"
            for q in facts["quarantined"]
        ),
        "nothing quarantined",
    )
    preheats = _table(
        ("image", "state", "progress", "kept until"),
        (
            f'<tr><td class="mono">{escape(h["ref"])}</td><td>{escape(h["state"])}</td>'
            f'<td class="num">{escape(human_bytes(h["bytes_done"]))} of '
            f"{escape(human_bytes(h['bytes_total']))}</td><td>{_clock(h['until'])}</td></tr>"
            for h in facts["preheats"]
        ),
        "no preheated images",
    )
    problem = facts.get("last_problem")
    problem_html = (
        f'<p class="problem">{_clock(problem["at"])} {escape(problem["level"])}: '
        f"{escape(problem['message'])}</p>"
        if problem
        else '<p class="empty">none</p>'
    )
    addrs = "".join(f"<li><code>{escape(a)}</code></li>" for a in node["addrs"])
    title = f"shoal on {escape(node['hostname'])}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{CSS}</style></head>
<body>
<header><h1>{title}</h1>{badge}<span class="id">{escape(node["peer_id"] or "no peer id yet")}</span>
</header>
<main>
<section id="node"><h2>This node</h2><table>
<tr><th>registry API</th><td class="mono">{escape(node["listen"])}</td></tr>
<tr><th>status and metrics</th><td class="mono">{escape(node["metrics_listen"])}</td></tr>
<tr><th>shoal</th><td>{escape(node["version"])}</td></tr>
<tr><th>containerd</th><td>{escape(node["containerd"])} (namespace {escape(node["namespace"])})</td>
</tr><tr><th>readiness</th><td>{checks}</td></tr>
<tr><th>libp2p addresses</th><td><ul>{addrs}</ul></td></tr></table>
<h2>Last problem</h2>{problem_html}</section>
<section class="wide" id="served"><h2>Served since start, by source</h2>
<div class="cards">{cards}</div>
<h2 style="margin-top:12px">Bytes by source, last hour</h2>{chart(facts["bytes_by_minute"])}
</section>
<section class="wide" id="pulls"><h2>Recent pulls</h2>{pulls}</section>
<section id="peers"><h2>Peers ({len(facts["peers"])})</h2>{peers}</section>
<section id="advertised"><h2>Advertised keys ({adv["count"]})</h2><ul>{sample}</ul></section>
<section id="refusals"><h2>Refusals {escape(counts)}</h2>{refusal_rows}</section>
<section id="quarantined"><h2>Quarantined digests</h2>{quarantined}</section>
<section class="wide" id="preheats"><h2>Preheated images</h2>{preheats}</section>
</main></body></html>
"""
