"""Every argument the chart passes to shoal exists, parses and means what the values say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from shoal.cli import main
from shoal.config import Settings

from .helpers import (
    FIELD_REFS,
    NAMESPACE,
    VALUE_SETS,
    container_env,
    containers,
    expand,
    pod_spec,
    render,
    shoal_commands,
)

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
