"""Which containerd the harness runs, and that version's native config.

`SHOAL_CONTAINERD=<version>` (or pytest's `--containerd`, which sets it) picks one of VERSIONS;
unset means PRIMARY. scripts/containerd-versions.sh puts each version's containerd, ctr and
containerd-shim-runc-v2 in `$SHOAL_CACHE/containerd/<version>/bin`; the harness runs those by
path and puts that directory first on containerd's PATH, because containerd starts the shim it
finds on PATH.

Config formats: version 2 for 1.x (1.7 refuses version 3; 1.6 boots it but ignores the CRI
`config_path` there), version 3 for 2.0-2.2, version 4 for 2.3+ (server sockets configured as
the `io.containerd.server.v1.*` plugins). Each version boots its own format without migrating.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV", "PRIMARY", "VERSIONS", "Runtime", "choose", "selected"]

ENV = "SHOAL_CONTAINERD"
VERSIONS = ("2.3.7", "2.1.9", "1.7.24", "1.6.20")
PRIMARY = VERSIONS[0]

# Snapshotters that fail to initialise here and only add noise; NRI would listen on the
# machine-wide /var/run/nri/nri.sock (2.x enables it by default).
_DISABLED = [
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
]
_DISABLED_SINCE = {
    (1, 7): ["io.containerd.snapshotter.v1.blockfile", "io.containerd.nri.v1.nri"],
    (2, 1): ["io.containerd.snapshotter.v1.erofs", "io.containerd.differ.v1.erofs"],
}


def _cache() -> Path:
    return Path(os.environ.get("SHOAL_CACHE", "/var/cache/shoal-dev")) / "containerd"


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@dataclass(frozen=True)
class Runtime:
    """One containerd version: where its binaries are and what it understands."""

    version: str
    bin_dir: Path
    explicit: bool = False  # chosen by the user, not the default

    @property
    def release(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    def at_least(self, major: int, minor: int = 0) -> bool:
        return self.release >= (major, minor)

    @property
    def config_version(self) -> int:
        if self.release >= (2, 3):
            return 4
        return 3 if self.release >= (2, 0) else 2

    @property
    def content_events(self) -> bool:
        """Whether containerd publishes /content/create when a blob is committed (2.1+)."""
        return self.at_least(2, 1)

    @property
    def cri_transfer_service(self) -> bool:
        """Whether CRI PullImage goes through the transfer service by default (2.1+)."""
        return self.at_least(2, 1)

    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    def available(self) -> bool:
        return all(
            (self.bin_dir / b).exists() for b in ("containerd", "ctr", "containerd-shim-runc-v2")
        )

    def env(self) -> dict[str, str]:
        """The environment for containerd: this version's directory first on PATH."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "/usr/bin:/bin")])
        return env

    def missing_reason(self) -> str:
        return (
            f"containerd {self.version} is not prepared in {self.bin_dir}: run "
            f"scripts/containerd-versions.sh {self.version} (scripts/setup.sh runs it)"
        )

    def disabled_plugins(self) -> list[str]:
        out = list(_DISABLED)
        for since, names in _DISABLED_SINCE.items():
            if self.release >= since:
                out += names
        return out

    def config(
        self,
        *,
        root: Path,
        state: Path,
        socket: Path,
        log_level: str,
        opt_dir: Path,
        snapshotter: str,
        config_path: str,
        cni_bin: str,
        cni_dir: Path,
        local_pull: bool = False,
    ) -> str:
        """config.toml for a private daemon in this version's native format.

        `config_path`: the CRI's hosts directory (a `:`-separated list is passed as is).
        `local_pull` (2.1+): CRI pulls with the client-side pull of 1.x instead of the
        transfer service (`use_local_image_pull`).
        """
        disabled = ", ".join(_q(p) for p in self.disabled_plugins())
        head = [
            f"version = {self.config_version}",
            f"root = {_q(str(root))}",
            f"state = {_q(str(state))}",
            f"disabled_plugins = [{disabled}]",
            "",
            "[debug]",
            f"  level = {_q(log_level)}",
            "",
        ]
        if self.config_version >= 4:
            servers = [
                '[plugins."io.containerd.server.v1.grpc"]',
                f"  address = {_q(str(socket))}",
                '[plugins."io.containerd.server.v1.ttrpc"]',
                f"  address = {_q(str(socket) + '.ttrpc')}",
            ]
        else:
            servers = [
                "[grpc]",
                f"  address = {_q(str(socket))}",
                "[ttrpc]",
                f"  address = {_q(str(socket) + '.ttrpc')}",
            ]
        opt = ['[plugins."io.containerd.internal.v1.opt"]', f"  path = {_q(str(opt_dir))}"]
        if self.config_version >= 3:
            images = '[plugins."io.containerd.cri.v1.images"]'
            cri = [
                images,
                f"  snapshotter = {_q(snapshotter)}",
                *(["  use_local_image_pull = true"] if local_pull else []),
                f"{images[:-1]}.registry]",
                f"  config_path = {_q(config_path)}",
                '[plugins."io.containerd.cri.v1.runtime".cni]',
                f"  bin_dirs = [{_q(cni_bin)}]",
                f"  conf_dir = {_q(str(cni_dir))}",
            ]
        else:
            if local_pull:
                raise ValueError(f"containerd {self.version} has no transfer service to opt out of")
            cri = [
                '[plugins."io.containerd.grpc.v1.cri".containerd]',
                f"  snapshotter = {_q(snapshotter)}",
                '[plugins."io.containerd.grpc.v1.cri".registry]',
                f"  config_path = {_q(config_path)}",
                '[plugins."io.containerd.grpc.v1.cri".cni]',
                f"  bin_dir = {_q(cni_bin)}",
                f"  conf_dir = {_q(str(cni_dir))}",
            ]
        return "\n".join([*head, *servers, "", *opt, "", *cri, ""])


def selected() -> Runtime:
    """The containerd chosen for this run (SHOAL_CONTAINERD, default PRIMARY)."""
    wanted = os.environ.get(ENV, "").strip()
    version = wanted or PRIMARY
    if version not in VERSIONS:
        raise ValueError(f"{ENV}={version!r}: choose one of {', '.join(VERSIONS)}")
    return Runtime(version, _cache() / version / "bin", explicit=bool(wanted))


def choose(version: str | None) -> Runtime:
    """Makes `version` (if given) the run's containerd, for scripts outside pytest (benches);
    raises SystemExit when it is not prepared."""
    if version:
        os.environ[ENV] = version
    rt = selected()
    if not rt.available():
        raise SystemExit(rt.missing_reason())
    return rt
