"""Tests of the Helm chart in charts/shoal.

The chart is rendered and linted by Helm itself: `helm-python-sdk` (PyPI) ships Helm v4's Go SDK
as a shared library (libhelm_c) inside its wheel and drives it through ctypes, so no helm binary
and no network are involved. Every rendered object is validated against the Kubernetes OpenAPI
schemas shipped in `kubernetes-validate` (strict: unknown fields fail), and every argument the
chart hands to shoal is parsed with shoal's own parser, so a flag the daemon does not have fails
here rather than in a crash-looping pod.

    .venv/bin/pytest tests/unit/test_chart.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from shoal.cli import build_parser, main
from shoal.config import OPTIONS, Settings

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "shoal"
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
    },
}


# --- rendering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


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


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, list[dict]]:
    return request.param, render(chart, VALUE_SETS[request.param])


MANAGED_SETS = sorted(
    name for name, v in VALUE_SETS.items() if v.get("hostsConfig", {}).get("enabled", True)
)


@pytest.fixture(scope="module", params=MANAGED_SETS)
def rendered_managed(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, list[dict]]:
    """The value sets in which the chart manages containerd's hosts directory."""
    return request.param, render(chart, VALUE_SETS[request.param])


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


# --- shoal's arguments -------------------------------------------------------------------------


def test_every_shoal_invocation_parses(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    parsed = shoal_commands(docs)
    hosts = VALUE_SETS[name].get("hostsConfig", {}).get("enabled", True)
    expected = {"shoal", "configure", "hosts-cleanup/preStop"} if hosts else {"shoal"}
    assert set(parsed) == expected
    run = parsed["shoal"]
    assert run.command == "run"
    Settings.from_namespace(run)  # every daemon setting present and typed
    if hosts:
        assert parsed["configure"].command == "configure"
        assert parsed["hosts-cleanup/preStop"].command == "cleanup"
        # configure writes and cleanup restores the same directory.
        assert parsed["configure"].hosts_dir == parsed["hosts-cleanup/preStop"].hosts_dir


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_configure_then_prestop_cleanup_restores_the_hosts_dir(
    rendered_managed: tuple[str, list[dict]], tmp_path: Path
) -> None:
    """Runs the init container's and the preStop hook's commands against a scratch directory."""
    _, docs = rendered_managed
    c = containers(docs)
    hosts = tmp_path / "certs.d"
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n\n'
        '[host."https://mirror.corp.example"]\n  capabilities = ["pull"]\n'
    )
    (hosts / "example.internal").mkdir()
    (hosts / "example.internal" / "hosts.toml").write_text('server = "https://example.internal"\n')
    before = tree(hosts)
    mount = shoal_commands(docs)["configure"].hosts_dir

    def on_scratch(argv: list[str], env: dict[str, str]) -> list[str]:
        argv = [expand(a, env) for a in argv]
        return [a.replace(f"--hosts-dir={mount}", f"--hosts-dir={hosts}") for a in argv]

    assert main(on_scratch(c["configure"]["args"], container_env(c["configure"]))) == 0
    configured = (hosts / "docker.io" / "hosts.toml").read_text()
    mirror = shoal_commands(docs)["configure"].mirror
    assert f'[host."{mirror}"]' in configured
    assert configured.index(mirror) < configured.index("mirror.corp.example")
    pre_stop = c["hosts-cleanup"]["lifecycle"]["preStop"]["exec"]["command"]
    assert main(on_scratch(pre_stop[1:], container_env(c["hosts-cleanup"]))) == 0
    assert tree(hosts) == before


def test_an_unknown_flag_fails_the_argument_check(chart: helm.Chart) -> None:
    docs = render(chart, {"extraArgs": ["--no-such-option=1"]})
    with pytest.raises(AssertionError, match="no-such-option"):
        shoal_commands(docs)


def test_an_unknown_shoal_variable_fails_the_argument_check(chart: helm.Chart) -> None:
    docs = render(chart, {"extraEnv": [{"name": "SHOAL_NO_SUCH_OPTION", "value": "1"}]})
    with pytest.raises(AssertionError, match="SHOAL_NO_SUCH_OPTION"):
        shoal_commands(docs)


def test_a_bad_choice_in_a_shoal_variable_fails_the_argument_check(chart: helm.Chart) -> None:
    docs = render(chart, {"extraEnv": [{"name": "SHOAL_TAG_POLICY", "value": "newest"}]})
    with pytest.raises(AssertionError, match="SHOAL_TAG_POLICY"):
        shoal_commands(docs)


def test_default_run_settings(chart: helm.Chart) -> None:
    run = shoal_commands(render(chart))["shoal"]
    assert run.containerd_socket == "/run/containerd/containerd.sock"
    assert run.containerd_namespace == "k8s.io"
    assert run.content_root == "/var/lib/containerd/io.containerd.content.v1.content"
    assert run.data_dir == "/var/lib/shoal"
    assert (run.listen, run.metrics_listen, run.p2p_listen) == (
        "0.0.0.0:30020",
        "0.0.0.0:30021",
        "0.0.0.0:30022",
    )
    assert run.bootstrap == "kubernetes"
    assert run.bootstrap_k8s_namespace == NAMESPACE
    assert run.p2p_announce == FIELD_REFS["status.hostIP"]
    assert run.ready_alone is False
    assert run.tag_policy == "upstream-first"
    assert run.log_level == "info"
    assert run.mirror_registries == [
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "gcr.io",
        "public.ecr.aws",
    ]
    assert run.upstream_credentials == run.p2p_psk == ""


def test_default_configure_args(chart: helm.Chart) -> None:
    configure = containers(render(chart))["configure"]
    assert configure["args"] == [
        "configure",
        "--hosts-dir=/host/etc/containerd/certs.d",
        "--mirror=http://127.0.0.1:30020",
        "--registry=docker.io",
        "--registry=ghcr.io",
        "--registry=quay.io",
        "--registry=registry.k8s.io",
        "--registry=gcr.io",
        "--registry=public.ecr.aws",
        "--resolve-tags=true",
    ]


def test_the_mirror_url_reaches_the_registry_listener(
    rendered_managed: tuple[str, list[dict]],
) -> None:
    _, docs = rendered_managed
    parsed = shoal_commands(docs)
    port = int(parsed["shoal"].listen.rsplit(":", 1)[1])
    mirror = parsed["configure"].mirror
    assert mirror.endswith(f":{port}")
    if pod_spec(docs).get("hostNetwork"):
        assert mirror in (
            f"http://127.0.0.1:{port}",
            f"http://{FIELD_REFS['status.hostIP']}:{port}",
        )
    else:
        # In the pod network only the node address reaches the host port, not loopback.
        assert mirror == f"http://{FIELD_REFS['status.hostIP']}:{port}"
    ports = {p["name"]: p for p in containers(docs)["shoal"]["ports"]}
    assert ports["registry"]["hostPort"] == ports["registry"]["containerPort"] == port


def test_resolve_tags_follows_the_tag_policy(chart: helm.Chart) -> None:
    def resolve(values: dict[str, Any]) -> bool:
        return shoal_commands(render(chart, values))["configure"].resolve_tags

    assert resolve({}) is True
    assert resolve({"tagPolicy": "peers"}) is True
    assert resolve({"tagPolicy": "digest-only"}) is False
    assert resolve({"tagPolicy": "digest-only", "resolveTags": True}) is True
    assert resolve({"resolveTags": False}) is False


def test_upstream_allow_list_is_the_mirrored_registry_names(chart: helm.Chart) -> None:
    registries = ["docker.io", "_default", "10.0.0.5:5000=http://10.0.0.5:5000"]
    parsed = shoal_commands(render(chart, {"registries": registries}))
    assert parsed["shoal"].mirror_registries == ["docker.io", "10.0.0.5:5000"]
    assert parsed["configure"].registry == registries


def test_extra_args_and_env_reach_shoal(chart: helm.Chart) -> None:
    run = shoal_commands(render(chart, VALUE_SETS["hostport-dns-full"]))["shoal"]
    assert run.spool_max_bytes == 1073741824
    assert run.resync_interval == 30.0
    assert run.upstream_insecure == ["registry.internal:5000"]


# --- pod properties ----------------------------------------------------------------------------


def test_daemonset_defaults(chart: helm.Chart) -> None:
    docs = render(chart)
    ds = only(docs, "DaemonSet")
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    spec = pod_spec(docs)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["serviceAccountName"] == only(docs, "ServiceAccount")["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is True
    assert [c["name"] for c in spec["initContainers"]] == ["configure"]
    assert [c["name"] for c in spec["containers"]] == ["shoal", "hosts-cleanup"]
    # The pod template carries the selector labels.
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_every_container_is_locked_down(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for name, c in containers(docs).items():
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["privileged"] is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert "resources" in c and c["resources"]["limits"]["memory"], name


def volumes_by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(docs)["volumes"]}


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def test_default_mounts(chart: helm.Chart) -> None:
    docs = render(chart)
    vols = volumes_by_name(docs)
    c = containers(docs)
    main = mounts(c["shoal"])

    # The socket's directory (survives containerd restarts), read-only: connect() still works.
    assert vols["containerd-socket"]["hostPath"] == {"path": "/run/containerd", "type": "Directory"}
    assert main["containerd-socket"] == {
        "name": "containerd-socket",
        "mountPath": "/run/containerd",
        "readOnly": True,
    }
    content = "/var/lib/containerd/io.containerd.content.v1.content"
    assert vols["containerd-content"]["hostPath"] == {"path": content, "type": "Directory"}
    assert main["containerd-content"]["readOnly"] is True
    assert main["containerd-content"]["mountPath"] == content
    assert vols["data"]["hostPath"] == {"path": "/var/lib/shoal", "type": "DirectoryOrCreate"}
    assert not main["data"].get("readOnly", False)
    assert "emptyDir" in vols["tmp"]

    # Only the configure and cleanup containers may write containerd's hosts directory.
    hosts = {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}
    assert vols["containerd-hosts"]["hostPath"] == hosts
    assert "containerd-hosts" not in main
    for name in ("configure", "hosts-cleanup"):
        assert mounts(c[name]) == {
            "containerd-hosts": {
                "name": "containerd-hosts",
                "mountPath": "/host/etc/containerd/certs.d",
            }
        }


def test_k3s_paths(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["k3s-static"])
    vols = volumes_by_name(docs)
    assert vols["containerd-socket"]["hostPath"]["path"] == "/run/k3s/containerd"
    assert vols["containerd-content"]["hostPath"]["path"] == K3S["contentDir"]
    assert vols["containerd-hosts"]["hostPath"]["path"] == K3S["hostsDir"]
    parsed = shoal_commands(docs)
    assert parsed["shoal"].containerd_socket == K3S["socket"]
    assert parsed["configure"].hosts_dir == "/host" + K3S["hostsDir"]
    assert parsed["shoal"].listen == "[::]:30020"
    assert parsed["shoal"].bootstrap_peers == VALUE_SETS["k3s-static"]["bootstrap"]["staticPeers"]
    assert parsed["configure"].resolve_tags is False
    assert "priorityClassName" not in pod_spec(docs)


def test_a_hosts_dir_list_mounts_and_configures_its_first_directory(chart: helm.Chart) -> None:
    """EKS's config_path `/etc/containerd/certs.d:/etc/docker/certs.d`, given as is."""
    listed = "/etc/containerd/certs.d:/etc/docker/certs.d"
    docs = render(chart, {"containerd": {"hostsDir": listed}})
    vols = volumes_by_name(docs)
    assert vols["containerd-hosts"]["hostPath"]["path"] == "/etc/containerd/certs.d"
    parsed = shoal_commands(docs)
    assert parsed["configure"].hosts_dir == "/host/etc/containerd/certs.d"
    assert parsed["hosts-cleanup/preStop"].hosts_dir == "/host/etc/containerd/certs.d"


def test_ports_and_probes(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    main = containers(docs)["shoal"]
    run = shoal_commands(docs)["shoal"]
    ports = {p["name"]: p for p in main["ports"]}
    assert set(ports) == {"registry", "metrics", "p2p"}
    for port_name, listen in (
        ("registry", run.listen),
        ("metrics", run.metrics_listen),
        ("p2p", run.p2p_listen),
    ):
        number = int(listen.rsplit(":", 1)[1])
        assert ports[port_name]["containerPort"] == ports[port_name]["hostPort"] == number
        assert ports[port_name]["protocol"] == "TCP"
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert main[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe


def test_downward_api_env(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    env = {e["name"]: e for e in containers(docs)["shoal"]["env"]}
    assert env["SHOAL_P2P_ANNOUNCE"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert env["SHOAL_BOOTSTRAP_K8S_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }


def test_hostport_mode(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["hostport-dns-full"])
    spec = pod_spec(docs)
    assert spec["hostNetwork"] is False
    assert spec["dnsPolicy"] == "ClusterFirst"
    configure = containers(docs)["configure"]
    assert "--mirror=http://$(NODE_IP):31020" in configure["args"]
    assert {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in (
        configure["env"]
    )
    assert containers(docs)["shoal"]["image"] == "ghcr.io/shoal-dev/shoal@sha256:" + "ab" * 32


def test_preStop_restores_hosts_on_every_node(chart: helm.Chart) -> None:
    docs = render(chart)
    cleanup = containers(docs)["hosts-cleanup"]
    assert cleanup["lifecycle"]["preStop"]["exec"]["command"][:2] == ["shoal", "cleanup"]
    # The sidecar idles but exits promptly on SIGTERM, so termination never waits the full grace.
    assert cleanup["command"][:2] == ["/bin/sh", "-c"]
    assert "trap 'exit 0' TERM" in cleanup["command"][2]
    assert "lifecycle" not in containers(docs)["shoal"]
    # A post-delete Job would run on one node only: the chart has no hooks at all.
    for doc in docs:
        assert "helm.sh/hook" not in doc["metadata"].get("annotations", {})


def test_unmanaged_hosts_has_no_hosts_access(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["unmanaged-hosts"])
    spec = pod_spec(docs)
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["shoal"]
    assert "containerd-hosts" not in volumes_by_name(docs)
    assert "containerd-content" not in volumes_by_name(docs)
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "existing"
    assert shoal_commands(docs)["shoal"].content_root == ""
    assert set(kinds(docs)) == {"DaemonSet"}


def test_secrets_are_mounted_as_files(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["hostport-dns-full"])
    vols = volumes_by_name(docs)
    main = mounts(containers(docs)["shoal"])
    run = shoal_commands(docs)["shoal"]
    for vol, secret, key, flag_value in (
        ("upstream-credentials", "pull-creds", ".dockerconfigjson", run.upstream_credentials),
        ("p2p-psk", "shoal-psk", "swarm.key", run.p2p_psk),
    ):
        source = vols[vol]["secret"]
        assert source["secretName"] == secret
        assert source["defaultMode"] == 0o400
        [item] = source["items"]
        assert item["key"] == key
        assert main[vol]["readOnly"] is True
        assert flag_value == f"{main[vol]['mountPath']}/{item['path']}"


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


# The metric families the dashboard is built on (the daemon's contract, see shoal/metrics.py).
METRICS = {
    "shoal_requests_total": "counter",
    "shoal_bytes_served_total": "counter",
    "shoal_bytes_to_peers_total": "counter",
    "shoal_request_duration_seconds": "histogram",
    "shoal_peers": "gauge",
    "shoal_advertised_keys": "gauge",
    "shoal_misses_total": "counter",
    "shoal_verify_failures_total": "counter",
}
LABEL_VALUES = {"source": {"local", "peer", "upstream"}, "kind": {"blob", "manifest"}}


def family(sample_name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix) and sample_name.removesuffix(suffix) in METRICS:
            return sample_name.removesuffix(suffix)
    return sample_name


def dashboard_exprs(chart: helm.Chart) -> list[str]:
    docs = render(chart, VALUE_SETS["hostport-dns-full"])
    cm = only(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["shoal.json"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]


def test_grafana_dashboard_uses_shoal_metrics(chart: helm.Chart) -> None:
    exprs = dashboard_exprs(chart)
    used = {family(m) for e in exprs for m in re.findall(r"\bshoal_[a-z_]+", e)}
    assert used == set(METRICS), set(METRICS) ^ used
    for label, allowed in LABEL_VALUES.items():
        for expr in exprs:
            for match in re.findall(rf'\b{label}=~?"([^"]*)"', expr):
                assert set(match.split("|")) <= allowed, expr


def test_dashboard_metrics_exist_in_the_daemon() -> None:
    metrics = pytest.importorskip("shoal.metrics", reason="shoal.metrics not importable")
    exported = dict(re.findall(r"# TYPE (\S+) (\S+)", metrics.render().decode()))
    assert {name: exported.get(name) for name in METRICS} == METRICS


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
