"""What the chart asks of the cluster: RBAC, bootstrap, metrics and the network policy."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from .helpers import (
    NAMESPACE,
    VALUE_SETS,
    containers,
    kinds,
    only,
    pod_spec,
    render,
    shoal_commands,
)

# --- RBAC and bootstrap ------------------------------------------------------------------------


def test_rbac_is_minimal(chart: helm.Chart) -> None:
    docs = render(chart)
    role = only(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    binding = only(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = only(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("mode", ["none", "dns", "static"])
def test_no_api_access_without_kubernetes_bootstrap(chart: helm.Chart, mode: str) -> None:
    values: dict[str, Any] = {"bootstrap": {"mode": mode, "staticPeers": ["/ip4/10.0.0.1/tcp/1"]}}
    docs = render(chart, values)
    assert not {"Role", "RoleBinding"} & set(kinds(docs))
    assert pod_spec(docs)["automountServiceAccountToken"] is False


def parse_selector(selector: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in selector.split(","))


def test_kubernetes_bootstrap_selects_exactly_this_release(chart: helm.Chart) -> None:
    docs = render(chart)
    run = shoal_commands(docs)["shoal"]
    selector = parse_selector(run.bootstrap_k8s_selector)
    ds = only(docs, "DaemonSet")
    assert selector == ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_dns_bootstrap_uses_a_headless_service(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["hostport-dns-full"])
    run = shoal_commands(docs)["shoal"]
    headless = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    svc = headless[0]
    assert run.bootstrap_dns == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    # Pods become ready only after finding a peer: not-ready pods must resolve too.
    assert svc["spec"]["publishNotReadyAddresses"] is True
    pod_labels = only(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [
        {"name": "p2p", "port": 31022, "targetPort": "p2p", "protocol": "TCP"}
    ]


def test_no_headless_service_without_dns_bootstrap(chart: helm.Chart) -> None:
    docs = render(chart)
    assert [d["spec"].get("clusterIP") for d in docs if d["kind"] == "Service"] == [None]


# --- monitoring --------------------------------------------------------------------------------


def test_metrics_service_and_service_monitor(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["hostport-dns-full"])
    pod_labels = only(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    metrics = only(docs, "Service", "mirror-metrics")
    assert metrics["spec"]["selector"].items() <= pod_labels.items()
    assert metrics["spec"]["ports"] == [
        {"name": "metrics", "port": 31021, "targetPort": "metrics", "protocol": "TCP"}
    ]
    sm = only(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}


def test_network_policy(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["hostport-dns-full"])
    policy = only(docs, "NetworkPolicy")
    pod_labels = only(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers, metrics = policy["spec"]["ingress"]
    assert {p["port"] for p in peers["ports"]} == {"registry", "p2p"}
    assert peers["from"] == [{"ipBlock": {"cidr": "10.0.0.0/16"}}]
    assert [p["port"] for p in metrics["ports"]] == ["metrics"]
    named = {p["name"] for p in containers(docs)["shoal"]["ports"]}
    assert {p["port"] for rule in (peers, metrics) for p in rule["ports"]} <= named
