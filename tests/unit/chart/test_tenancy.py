"""The cluster key (a Secret the chart makes and keeps, or the user's), what is shared, and who
counts as the node's own containerd."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import helm_python as helm

from .helpers import (
    CHART_DIR,
    RELEASE,
    VALUE_SETS,
    containers,
    kinds,
    only,
    pod_spec,
    render,
    shoal_commands,
)

LOOKUP = 'lookup "v1" "Secret" .Release.Namespace $name'


def cluster_key_volume(docs: list[dict]) -> tuple[dict, dict]:
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "cluster-key")
    mount = next(m for m in containers(docs)["shoal"]["volumeMounts"] if m["name"] == "cluster-key")
    return volume["secret"], mount


def test_the_chart_makes_a_random_cluster_key_and_shoal_reads_it(chart: helm.Chart) -> None:
    docs = render(chart)
    secret = only(docs, "Secret")
    assert secret["metadata"]["name"] == f"{RELEASE}-cluster-key"
    value = base64.b64decode(secret["data"]["cluster.key"])
    assert len(value) == 64 and value.isalnum()
    again = base64.b64decode(only(render(chart), "Secret")["data"]["cluster.key"])
    assert again != value  # random per install (an upgrade keeps the installed one, below)
    source, mount = cluster_key_volume(docs)
    assert source["secretName"] == secret["metadata"]["name"]
    assert source["defaultMode"] == 0o400 and mount["readOnly"] is True
    [item] = source["items"]
    assert item["key"] == "cluster.key"
    assert shoal_commands(docs)["shoal"].cluster_key_file == f"{mount['mountPath']}/{item['path']}"
    # Nothing but the daemon mounts it.
    others = [c for name, c in containers(docs).items() if name != "shoal"]
    assert all("cluster-key" not in {m["name"] for m in c.get("volumeMounts", [])} for c in others)


def test_an_upgrade_keeps_the_installed_cluster_key(tmp_path: Path) -> None:
    """`lookup` finds the Secret the install made (here stood in for: no API server)."""
    installed = base64.b64encode(b"k" * 64).decode()
    copy = tmp_path / "shoal"
    shutil.copytree(CHART_DIR, copy)
    template = copy / "templates" / "secret.yaml"
    text = template.read_text()
    assert LOOKUP in text
    template.write_text(text.replace(LOOKUP, f'dict "data" (dict "cluster.key" "{installed}")'))
    with helm.Chart.load(copy) as upgraded:
        docs = render(upgraded)
    assert only(docs, "Secret")["data"]["cluster.key"] == installed


def test_an_existing_secret_is_used_and_none_is_made(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["unmanaged-hosts"])
    assert "Secret" not in kinds(docs)
    source, _ = cluster_key_volume(docs)
    assert source["secretName"] == "our-cluster-key"
    assert source["items"][0]["key"] == "secret"


def test_sharing_defaults_are_safe_and_values_reach_shoal(chart: helm.Chart) -> None:
    run = shoal_commands(render(chart))["shoal"]
    assert (run.share_registries, run.share_repositories, run.share_unknown) == ([], [], False)
    assert run.status_refresh == 3600.0
    assert run.local_addresses == []  # hostNetwork: loopback only
    full = shoal_commands(render(chart, VALUE_SETS["hostport-dns-full"]))["shoal"]
    assert full.share_registries == ["registry.internal:5000"]
    assert full.share_repositories == ["docker.io/acme/*"]
    assert full.share_unknown is True and full.status_refresh == 600.0


def test_in_hostport_mode_the_node_address_is_the_local_containerd(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["hostport-dns-full"])
    run, configure = shoal_commands(docs)["shoal"], shoal_commands(docs)["configure"]
    assert run.local_addresses == ["10.1.2.3"]  # the node IP, as containerd's mirror URL uses
    assert "10.1.2.3" in configure.mirror
    explicit = shoal_commands(
        render(chart, {"hostNetwork": False, "localAddresses": ["10.9.0.1/32"]})
    )
    assert explicit["shoal"].local_addresses == ["10.9.0.1/32"]
