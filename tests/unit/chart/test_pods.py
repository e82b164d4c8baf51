"""The DaemonSet's pods: security, mounts, ports and probes, the hosts directory restored."""

from __future__ import annotations

from typing import Any

import helm_python as helm

from .helpers import K3S, VALUE_SETS, containers, kinds, only, pod_spec, render, shoal_commands

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
