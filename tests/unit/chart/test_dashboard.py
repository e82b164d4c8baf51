"""The chart's Grafana dashboard asks only for metrics shoal exports: every PromQL expression is
parsed, its metric names extracted, and each checked against shoal's own registry (a histogram's
`_bucket`, `_sum` and `_count` series against a histogram)."""

from __future__ import annotations

import json
import re

import helm_python as helm

from shoal import metrics

from .helpers import VALUE_SETS, only, render

# Label values the dashboard may filter on: what shoal's metrics carry.
LABEL_VALUES = {"source": {"local", "inflight", "peer", "upstream"}, "kind": {"blob", "manifest"}}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right"}  # fmt: skip
# Grafana's `label_values(<selector>, <label>)`: the label is no metric.
_LABEL_VALUES = re.compile(r"\blabel_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are neither functions,
    aggregations, keywords, label names (in selectors and grouping clauses) nor numbers."""
    text = _LABEL_VALUES.sub(r"(\1)", _STRING.sub('""', expr))
    text = re.sub(r"\{[^}]*\}", "", text)  # selectors: label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = _GROUPING.sub("", text)
    text = re.sub(r"(?<![A-Za-z_:])\d[\w.]*", "", text)  # numbers and durations (`offset 1h`)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if word in _KEYWORDS or rest.startswith("("):
            continue
        if text[max(0, match.start() - 1)] == "$":  # a Grafana variable
            continue
        names.add(word)
    return names


def exported() -> dict[str, str]:
    """Every series name shoal's registry exports, with its family's type."""
    families = dict(re.findall(r"# TYPE (\S+) (\S+)", metrics.render().decode()))
    series = dict(families)
    for name, kind in families.items():
        if kind == "histogram":
            series.update({name + suffix: kind for suffix in HISTOGRAM_SERIES})
    return series


def dashboard_exprs(chart: helm.Chart) -> list[str]:
    docs = render(chart, VALUE_SETS["hostport-dns-full"])
    cm = only(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["shoal.json"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]


def test_the_extractor_finds_metric_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, result) (rate(shoal_x_bucket{node=~"$node", '
        'source="peer|by"}[$__rate_interval]))) / ignoring(source) group_left '
        "sum(rate(shoal_y_total[5m] offset 1h)) or vector(0) and on (node) up"
    )
    assert metric_names(expr) == {"shoal_x_bucket", "shoal_y_total", "up"}
    assert metric_names('label_values(shoal_peers{namespace=~"$namespace"}, node)') == {
        "shoal_peers"
    }


def test_every_dashboard_expression_reads_only_exported_shoal_metrics(chart: helm.Chart) -> None:
    series = exported()
    exprs = dashboard_exprs(chart)
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr}"
        unknown = sorted(n for n in names if n not in series)
        assert not unknown, f"{expr}: not exported by shoal: {unknown}"
        used |= names
    # The list of what an operator alerts on is on the dashboard.
    for name in (
        "shoal_pull_bytes_total", "shoal_pulls_total", "shoal_lookup_duration_seconds_bucket",
        "shoal_resolve_duration_seconds_bucket", "shoal_upstream_errors_total",
        "shoal_upstream_throttled_total", "shoal_inflight_streams", "shoal_spool_bytes",
    ):  # fmt: skip
        assert name in used, name
    for label, allowed in LABEL_VALUES.items():
        for expr in exprs:
            for match in re.findall(rf'\b{label}=~?"([^"]*)"', expr):
                assert set(match.split("|")) <= allowed, expr
