"""The rendered objects: Helm lint, the Kubernetes schemas, labels, and values refused."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from .helpers import (
    CHART_DIR,
    CRD_KINDS,
    K8S_VERSIONS,
    NAMESPACE,
    RELEASE,
    VALUE_SETS,
    kinds,
    render,
)

# --- lint and schema validation ----------------------------------------------------------------


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_helm_lint_strict_is_clean(values_name: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[values_name], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # The only finding allowed is Helm's INFO that an icon URL is recommended: shoal has none.
    findings = [m for m in report["messages"] if m["error"] != "icon is recommended"]
    assert findings == []


def test_manifests_are_valid_kubernetes_objects(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for doc in docs:
        assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                where = ".".join(str(p) for p in err.path)
                pytest.fail(
                    f"{doc['kind']}/{doc['metadata']['name']} ({version}): {where}: {err.message}",
                    pytrace=False,
                )


def test_every_object_carries_the_recommended_labels(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "shoal"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"]
        assert labels["helm.sh/chart"].startswith("shoal-")


def test_no_cluster_scoped_objects(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    assert not {"ClusterRole", "ClusterRoleBinding", "Namespace"} & set(kinds(docs))


# --- values validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"tagPolicy": "newest"},
        {"bootstrap": {"mode": "mdns"}},
        {"ports": {"registry": 0}},
        {"logLevel": "trace"},
        {"registries": ["https://docker.io"]},
        {"containerd": {"socket": "relative.sock"}},
        {"resolveTags": "yes"},
        {"unknownKey": True},
    ],
    ids=lambda v: json.dumps(v),
)
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bootstrap": {"mode": "static"}}, "staticPeers"),
        ({"ports": {"metrics": 30020}}, "must differ"),
        ({"registries": []}, "registries"),
        ({"serviceMonitor": {"enabled": True}, "metricsService": {"enabled": False}}, "metrics"),
    ],
)
def test_inconsistent_values_fail_rendering(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)
