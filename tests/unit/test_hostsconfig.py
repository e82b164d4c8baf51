"""`shoal configure` / `shoal cleanup` on a hosts directory, as containerd reads it."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from shoal.cli import main
from shoal.hostsconfig import BACKUP_DIR, cleanup, configure
from tests.fakes.files import snapshot

MIRROR = "http://127.0.0.1:30020"


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    root = tmp_path / "certs.d"
    (root / "docker.io").mkdir(parents=True)
    existing = (
        'server = "https://registry-1.docker.io"\n\n'
        '[host."https://mirror.corp.example"]\n'
        '  capabilities = ["pull"]\n  ca = "/etc/ssl/corp.pem"\n'
        '  [host."https://mirror.corp.example".header]\n    x-team = ["platform"]\n'
    )
    (root / "docker.io" / "hosts.toml").write_text(existing)
    os.chmod(root / "docker.io" / "hosts.toml", 0o600)
    (root / "quay.io").mkdir()  # a directory without a file
    (root / "ghcr.io").mkdir()
    (root / "ghcr.io" / "hosts.toml").write_bytes(b"not = [valid toml")
    return root


def test_configure_then_cleanup_is_byte_identical(hosts: Path) -> None:
    before = snapshot(hosts)
    registries = [
        "docker.io",
        "quay.io",
        "ghcr.io",
        "127.0.0.1:5000=http://127.0.0.1:5000",
        "_default",
    ]
    assert (
        main(
            [
                "configure",
                "--hosts-dir",
                str(hosts),
                "--mirror",
                MIRROR,
                *[arg for r in registries for arg in ("--registry", r)],
            ]
        )
        == 0
    )
    assert snapshot(hosts) != before
    # A restarted init container configures again: the first backup must survive.
    configure(str(hosts), MIRROR, ["docker.io", "quay.io"])
    assert main(["cleanup", "--hosts-dir", str(hosts)]) == 0
    assert snapshot(hosts) == before
    cleanup(str(hosts))  # idempotent
    assert snapshot(hosts) == before


def test_cleanup_removes_a_directory_it_created(tmp_path: Path) -> None:
    root = tmp_path / "absent" / "certs.d"
    configure(str(root), MIRROR, ["_default"])
    assert (root / "_default" / "hosts.toml").is_file()
    cleanup(str(root))
    assert not root.exists()


def test_a_config_path_list_is_configured_in_its_first_directory(
    hosts: Path, tmp_path: Path
) -> None:
    """EKS: config_path `/etc/containerd/certs.d:/etc/docker/certs.d`. containerd looks in the
    first directory first, so shoal writes there; the second is never touched."""
    docker_dir = tmp_path / "docker-certs.d"
    (docker_dir / "docker.io").mkdir(parents=True)
    (docker_dir / "docker.io" / "hosts.toml").write_text('server = "https://mirror.example"\n')
    listed = f"{hosts}:{docker_dir}"
    first_before, second_before = snapshot(hosts), snapshot(docker_dir)
    assert main(["configure", "--hosts-dir", listed, "--mirror", MIRROR,
                 "--registry", "docker.io"]) == 0  # fmt: skip
    doc = tomllib.loads((hosts / "docker.io" / "hosts.toml").read_text())
    assert next(iter(doc["host"])) == MIRROR
    assert snapshot(docker_dir) == second_before
    assert not Path(listed).exists()  # no directory named after the whole list
    assert main(["cleanup", "--hosts-dir", listed]) == 0
    assert snapshot(hosts) == first_before
    assert snapshot(docker_dir) == second_before
    with pytest.raises(ValueError):
        configure("::", MIRROR, ["docker.io"])


def test_written_files_are_what_containerd_accepts(hosts: Path) -> None:
    configure(
        str(hosts),
        MIRROR,
        ["docker.io", "quay.io", "ghcr.io", "_default", "127.0.0.1:5000=http://127.0.0.1:5000"],
    )
    docs = {
        d: tomllib.loads((hosts / d / "hosts.toml").read_text())
        for d in ("docker.io", "quay.io", "ghcr.io", "_default", "127.0.0.1:5000")
    }
    for doc in docs.values():
        hosts_tables = list(doc["host"])
        assert hosts_tables[0] == MIRROR  # shoal first
        mirror = doc["host"][MIRROR]
        assert mirror == {"capabilities": ["pull", "resolve"]}  # no TLS keys on plain HTTP
        for table in doc["host"].values():
            assert "referrers" not in table.get("capabilities", [])  # 1.x rejects the file
    assert docs["docker.io"]["server"] == "https://registry-1.docker.io"
    # The user's own mirror stays, behind shoal, with its settings.
    corp = docs["docker.io"]["host"]["https://mirror.corp.example"]
    assert corp == {
        "capabilities": ["pull"],
        "ca": "/etc/ssl/corp.pem",
        "header": {"x-team": ["platform"]},
    }
    assert docs["quay.io"]["server"] == "https://quay.io"
    assert "server" not in docs["_default"]
    assert docs["127.0.0.1:5000"]["server"] == "http://127.0.0.1:5000"
    assert (hosts / BACKUP_DIR).is_dir()


def test_resolve_can_be_turned_off(tmp_path: Path) -> None:
    configure(str(tmp_path), MIRROR, ["docker.io"], resolve=False)
    doc = tomllib.loads((tmp_path / "docker.io" / "hosts.toml").read_text())
    assert doc["host"][MIRROR]["capabilities"] == ["pull"]


@pytest.mark.parametrize("spec", ["../etc", ".shoal-backup", "a/b", "x=ftp://y", ""])
def test_bad_registry_specs(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ValueError):
        configure(str(tmp_path), MIRROR, [spec])
