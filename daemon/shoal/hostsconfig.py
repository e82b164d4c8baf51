"""containerd's hosts directory (`config_path`): point registries at shoal, and undo it exactly.

`configure` writes `<dir>/<registry>/hosts.toml` with shoal as the first mirror. Hosts the old file
already listed stay behind shoal, and its `server` is kept. Before touching anything it records,
in `<dir>/.shoal-backup/`, the exact bytes of every file it replaces (or that there was none), so
`cleanup` restores the directory byte for byte. Running `configure` again keeps the first backup.

containerd's `config_path` may list several directories separated by `:` (EKS ships
`/etc/containerd/certs.d:/etc/docker/certs.d`). For each registry, containerd's local pull uses
the first directory that has a `<host>/` or `_default/` entry, so both commands act on the first
directory: what shoal writes there wins, and the others are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

BACKUP_DIR = ".shoal-backup"
MARKER = "# Written by shoal; `shoal cleanup` restores the previous configuration.\n"
DEFAULT = "_default"
_SERVERS = {"docker.io": "https://registry-1.docker.io"}


def primary_dir(config_path: str) -> str:
    """The directory of a `config_path` (`a` or `a:b:…`) that containerd looks in first."""
    first = next((p for p in config_path.split(":") if p), "")
    if not first:
        raise ValueError(f"no directory in config_path {config_path!r}")
    return first


def parse_registry_spec(spec: str) -> tuple[str, str | None]:
    """`host[:port]` or `host[:port]=<server URL>` (where containerd falls back to)."""
    name, sep, server = spec.partition("=")
    name = name.strip()
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"invalid registry {spec!r}")
    if sep and not server.startswith(("http://", "https://")):
        raise ValueError(f"server of {name} must be an http(s) URL, got {server!r}")
    return name, (server or None)


def render(mirror: str, registry: str, server: str | None, old: bytes | None, resolve: bool) -> str:
    """The hosts.toml text: shoal first, then the hosts the old file had (minus shoal itself)."""
    previous: dict[str, Any] = {}
    if old is not None:
        try:
            previous = tomllib.loads(old.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            previous = {}  # containerd could not read it either; shoal's entry replaces it
    lines = [MARKER]
    if server is None and isinstance(previous.get("server"), str):
        server = previous["server"]
    if server is None and registry != DEFAULT:
        server = _SERVERS.get(registry, f"https://{registry}")
    if server:
        lines.append(f"server = {_toml_value(server)}\n")
    capabilities = ["pull", "resolve"] if resolve else ["pull"]
    # A plain-HTTP mirror carries no TLS keys, or newer containerd tries HTTPS first.
    lines.append(f"\n[host.{_toml_value(mirror)}]\n  capabilities = {_toml_value(capabilities)}\n")
    hosts = previous.get("host")
    if isinstance(hosts, dict):
        for url, table in hosts.items():
            if url.rstrip("/") == mirror.rstrip("/") or not isinstance(table, dict):
                continue
            lines.append(f"\n[host.{_toml_value(url)}]\n")
            lines.extend(_table_lines(table, f"host.{_toml_value(url)}"))
    return "".join(lines)


def _table_lines(table: dict[str, Any], path: str) -> list[str]:
    plain = [
        f"  {_key(k)} = {_toml_value(v)}\n" for k, v in table.items() if not isinstance(v, dict)
    ]
    nested = []
    for k, v in table.items():
        if isinstance(v, dict):
            nested.append(f"\n[{path}.{_key(k)}]\n")
            nested.extend(_table_lines(v, f"{path}.{_key(k)}"))
    return plain + nested


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"unsupported value in hosts.toml: {value!r}")


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.shoal-tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def configure(hosts_dir: str, mirror: str, registries: list[str], *, resolve: bool = True) -> None:
    root = Path(primary_dir(hosts_dir))
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    backup = root / BACKUP_DIR
    state_file = backup / "state.json"
    state: dict[str, Any] = {"created_root": created_root, "entries": {}}
    if state_file.exists():
        state = json.loads(state_file.read_text())
    backup.mkdir(exist_ok=True)
    for spec in registries:
        registry, server = parse_registry_spec(spec)
        reg_dir = root / registry  # containerd looks up `<host>:<port>` as-is
        target = reg_dir / "hosts.toml"
        entry = state["entries"].get(registry)
        if entry is None:  # first configure of this registry: remember what was there
            entry = {"dir_existed": reg_dir.is_dir(), "file_existed": target.is_file()}
            if entry["file_existed"]:
                entry["mode"] = target.stat().st_mode & 0o7777
                shutil.copyfile(target, backup / f"{registry}.hosts.toml")
            state["entries"][registry] = entry
            _write_atomic(state_file, json.dumps(state, indent=1).encode())
        old_file = backup / f"{registry}.hosts.toml"
        old = old_file.read_bytes() if entry["file_existed"] else None
        reg_dir.mkdir(exist_ok=True)
        _write_atomic(target, render(mirror, registry, server, old, resolve).encode())


def cleanup(hosts_dir: str) -> None:
    root = Path(primary_dir(hosts_dir))
    backup = root / BACKUP_DIR
    state_file = backup / "state.json"
    if not state_file.exists():
        return
    state = json.loads(state_file.read_text())
    for registry, entry in state["entries"].items():
        reg_dir = root / registry  # containerd looks up `<host>:<port>` as-is
        target = reg_dir / "hosts.toml"
        if entry["file_existed"]:
            reg_dir.mkdir(exist_ok=True)
            _write_atomic(
                target, (backup / f"{registry}.hosts.toml").read_bytes(), entry.get("mode", 0o644)
            )
        else:
            target.unlink(missing_ok=True)
            if not entry["dir_existed"] and reg_dir.is_dir() and not any(reg_dir.iterdir()):
                reg_dir.rmdir()
    shutil.rmtree(backup)
    if state.get("created_root") and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
