"""What the chart tests share: the value sets, rendering with Helm's own engine, and parsing
what the chart hands to shoal with shoal's own parser (tests/unit/chart/__init__.py)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

from shoal.cli import build_parser
from shoal.config import OPTIONS

CHART_DIR = Path(__file__).resolve().parents[3] / "charts" / "shoal"
RELEASE = "shoal"
NAMESPACE = "shoal-system"
# A current release and the newest schemas the installed kubernetes-validate knows.
K8S_VERSIONS = sorted({"1.34.0", kubernetes_validate.latest_version()})
# Kinds that come from CRDs: kubernetes-validate has no schema for them; checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SHOAL_ENVS = {opt.env for opt in OPTIONS}
# Values the downward API would inject; any value of the right shape will do for parsing.
FIELD_REFS = {"status.hostIP": "10.1.2.3", "metadata.namespace": NAMESPACE}

K3S = {
    "socket": "/run/k3s/containerd/containerd.sock",
    "namespace": "k8s.io",
    "contentDir": "/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content",
    "hostsDir": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # Pod network + host ports, dns bootstrap and every optional object.
    "hostport-dns-full": {
        "hostNetwork": False,
        "fullnameOverride": "mirror",
        "image": {"digest": "sha256:" + "ab" * 32},
        "registries": [
            "docker.io",
            "registry.internal:5000=http://registry.internal:5000",
            "_default",
        ],
        "tagPolicy": "digest-only",
        "ports": {"registry": 31020, "metrics": 31021, "p2p": 31022},
        "bootstrap": {"mode": "dns"},
        "upstream": {
            "registries": ["docker.io", "registry.internal:5000"],
            "insecure": ["registry.internal:5000"],
            "credentials": {"secretName": "pull-creds", "key": ".dockerconfigjson"},
        },
        "p2p": {"psk": {"secretName": "shoal-psk", "key": "swarm.key"}},
        "sharing": {
            "registries": ["registry.internal:5000"],
            "repositories": ["docker.io/acme/*"],
            "unknown": True,
            "refreshSeconds": 600,
        },
        "extraArgs": ["--spool-max-bytes=1073741824", "--resync-interval", "30"],
        "extraEnv": [{"name": "SHOAL_CONTAINERD_NAMESPACE", "value": "k8s.io"}],
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "grafanaDashboard": {"enabled": True},
        "networkPolicy": {
            "enabled": True,
            "peers": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
            "metrics": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
            ],
        },
        "podAnnotations": {"example.com/team": "platform"},
        "commonLabels": {"example.com/owner": "platform"},
    },
    # k3s paths, static bootstrap, IPv6 listeners, explicit tag resolution.
    "k3s-static": {
        "containerd": K3S,
        "bootstrap": {
            "mode": "static",
            "staticPeers": [
                "/ip4/10.0.0.11/tcp/30022/p2p/12D3KooWQbWjq8B1Wcb9mQ7C9fr5bnYkVb3q6cK4h8cwVqRVAA5k",
            ],
        },
        "bindAddress": "::",
        "readyAlone": True,
        "logLevel": "debug",
        "resolveTags": False,
        "priorityClassName": "",
        "mirrorHost": "$(NODE_IP)",
    },
    # containerd configured by other means; no API access; no content dir mount.
    "unmanaged-hosts": {
        "hostsConfig": {"enabled": False},
        "bootstrap": {"mode": "none"},
        "metricsService": {"enabled": False},
        "serviceAccount": {"create": False, "name": "existing"},
        "rbac": {"create": False},
        "containerd": {"contentDir": ""},
        "clusterKey": {"existingSecret": "our-cluster-key", "key": "secret"},
    },
}


# --- rendering -------------------------------------------------------------------------------


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the release would create (schema-checked like `helm install`)."""
    rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "DaemonSet")["spec"]["template"]["spec"]


def containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    spec = pod_spec(docs)
    every = spec.get("initContainers", []) + spec["containers"]
    return {c["name"]: c for c in every}


MANAGED_SETS = sorted(
    name for name, v in VALUE_SETS.items() if v.get("hostsConfig", {}).get("enabled", True)
)


# --- shoal's parser ----------------------------------------------------------------------------


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ holding exactly `env` (shoal reads SHOAL_* variables when building its parser)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field in FIELD_REFS, f"unexpected downward API field {field}"
            env[var["name"]] = FIELD_REFS[field]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; an undefined variable would reach shoal unexpanded."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"{arg!r} refers to $({name}), which the container does not define"
        return env[name]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def parse_shoal(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    """Parses a command line as the `shoal` entry point would; AssertionError if it fails."""
    unknown = {name for name in env if name.startswith("SHOAL_")} - SHOAL_ENVS
    assert not unknown, f"environment sets {sorted(unknown)}, which shoal does not read"
    expanded = [expand(arg, env) for arg in argv]
    stderr = io.StringIO()
    with environment(env), contextlib.redirect_stderr(stderr):
        try:
            return build_parser().parse_args(expanded)
        except SystemExit:
            raise AssertionError(f"shoal rejects {expanded}: {stderr.getvalue().strip()}") from None


def shoal_commands(docs: list[dict[str, Any]]) -> dict[str, argparse.Namespace]:
    """Every shoal invocation in the pod: container args (ENTRYPOINT is shoal) and exec hooks."""
    image = containers(docs)["shoal"]["image"]
    parsed: dict[str, argparse.Namespace] = {}
    for name, c in containers(docs).items():
        assert c["image"] == image
        env = container_env(c)
        if "command" not in c:
            parsed[name] = parse_shoal(c["args"], env)
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if pre_stop:
            assert pre_stop[0] == "shoal", pre_stop
            parsed[f"{name}/preStop"] = parse_shoal(pre_stop[1:], env)
    return parsed
