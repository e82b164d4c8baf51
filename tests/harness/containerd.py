"""A private containerd daemon per simulated node, optionally inside a network namespace.

The version is the run's choice (tests/harness/runtime.py: SHOAL_CONTAINERD). The CRI plugin
stays enabled (shoal's CRI-driven pulls need it) with `registry.config_path` pointing at the
node's hosts dir and a loopback-only CNI config, so it reports NetworkReady without touching the
host's /etc/cni.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from .procs import HarnessError, Proc, start, unix_socket_open, wait_for
from .runtime import Runtime, selected

__all__ = ["ContainerdNode", "hosts_toml"]

_CNI_BIN_DIRS = ["/usr/lib/cni", "/opt/cni/bin"]
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; keep room for ".ttrpc"


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def hosts_toml(
    mirror_urls: list[str] | str | None = None,
    server_url: str | None = None,
    capabilities: tuple[str, ...] = ("pull", "resolve"),
) -> str:
    """hosts.toml text: mirrors in order, then `server` (omit it for `_default`).

    containerd 1.x ignores a file without any `[host."…"]` table, so with no mirror the server
    itself is also listed as a host.
    """
    if isinstance(mirror_urls, str):
        mirror_urls = [mirror_urls]
    hosts = list(mirror_urls or [])
    if not hosts and server_url:
        hosts = [server_url]
    if not hosts:
        raise ValueError("need a mirror or a server")
    caps = ", ".join(_toml_str(c) for c in capabilities)
    lines = [f"server = {_toml_str(server_url)}", ""] if server_url else []
    for url in hosts:
        lines += [f"[host.{_toml_str(url)}]", f"  capabilities = [{caps}]", ""]
    return "\n".join(lines)


class ContainerdNode:
    """containerd with its own root/state/sockets under `base_dir` (socket in a short temp dir
    if the path would exceed the unix socket limit).

    `runtime`: the containerd version (default: the run's, runtime.selected()). `local_pull`
    (2.1+): CRI pulls without the transfer service (`use_local_image_pull = true`).
    `cri_config_path`: the CRI's registry `config_path` (default: `hosts_dir`).
    """

    namespace = "k8s.io"

    def __init__(
        self,
        name: str,
        base_dir: Path,
        netns: str | None = None,
        *,
        snapshotter: str = "overlayfs",
        log_level: str = "info",
        runtime: Runtime | None = None,
        local_pull: bool = False,
        cri_config_path: str | None = None,
    ) -> None:
        self.name = name
        self.base_dir = Path(base_dir)
        self.netns = netns
        self.snapshotter = snapshotter
        self.log_level = log_level
        self.runtime = runtime or selected()
        self.local_pull = local_pull
        self.root = self.base_dir / "root"
        self.state = self.base_dir / "state"
        self.hosts_dir = self.base_dir / "hosts"
        self.cni_dir = self.base_dir / "cni"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self.content_root = self.root / "io.containerd.content.v1.content"
        self.cri_config_path = cri_config_path or str(self.hosts_dir)
        self._sock_dir: Path | None = None
        sock = self.base_dir / "sock" / "containerd.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH - 6:
            self._sock_dir = Path(tempfile.mkdtemp(prefix=f"shoal-{name[:12]}-", dir="/tmp"))
            sock = self._sock_dir / "containerd.sock"
        self.socket = sock
        self.proc: Proc | None = None

    @property
    def address(self) -> str:
        """gRPC target for grpcio clients."""
        return f"unix://{self.socket}"

    def _config(self) -> str:
        cni_bin = next((d for d in _CNI_BIN_DIRS if Path(d, "loopback").exists()), "/usr/lib/cni")
        return self.runtime.config(
            root=self.root, state=self.state, socket=self.socket, log_level=self.log_level,
            opt_dir=self.base_dir / "opt", snapshotter=self.snapshotter,
            config_path=self.cri_config_path, cni_bin=cni_bin, cni_dir=self.cni_dir,
            local_pull=self.local_pull,
        )  # fmt: skip

    def start(self, timeout: float = 20) -> ContainerdNode:
        if self.proc is not None and self.proc.alive():
            return self
        if not self.runtime.available():
            raise HarnessError(self.runtime.missing_reason())
        for d in (self.root, self.state, self.hosts_dir, self.cni_dir, self.socket.parent):
            d.mkdir(parents=True, exist_ok=True)
        (self.cni_dir / "10-loopback.conflist").write_text(
            json.dumps(
                {"cniVersion": "0.4.0", "name": "shoal-loopback", "plugins": [{"type": "loopback"}]}
            )
        )
        self.config_path.write_text(self._config())
        self.socket.unlink(missing_ok=True)  # a stale socket would look ready
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = start(
            [self.runtime.binary("containerd"), "--config", str(self.config_path)],
            name=f"containerd[{self.name}]",
            log_path=self.log_path,
            netns=self.netns,
            env=self.runtime.env(),  # the shim is looked up on PATH
        )
        # "booted" is logged once every plugin is loaded and the gRPC server serves.
        wait_for(
            lambda: self._booted(log_offset) and unix_socket_open(self.socket),
            timeout=timeout,
            what=f"containerd {self.name} to boot ({self.socket})",
            proc=self.proc,
        )
        return self

    def _booted(self, offset: int) -> bool:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return b"containerd successfully booted" in f.read()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)

    def restart(self) -> ContainerdNode:
        """Stop and start again (config.toml changes need this; hosts.toml ones do not)."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop and remove the short socket directory if one was made."""
        self.stop()
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __enter__(self) -> ContainerdNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- ctr -----------------------------------------------------------------------------

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`ctr -a SOCK -n k8s.io ARGS…`, inside the node's netns (ctr's own pulls fetch from
        the client process, so they must see the node's network)."""
        cmd = [self.runtime.binary("ctr"), "-a", str(self.socket), "-n", self.namespace, *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"[{self.name}] ctr {' '.join(args)} timed out") from exc
        if check and proc.returncode != 0:
            raise HarnessError(
                f"[{self.name}] ctr {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stderr.strip()}"
            )
        return proc

    def pull(
        self,
        ref: str,
        *,
        via_hosts: bool = True,
        plain_http: bool = False,
        platform: str | None = None,
        all_platforms: bool = False,
        all_metadata: bool = False,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr images pull` of a full reference (never a short name: ctr would ask DNS).

        ctr 2.x pulls through the transfer service and by default also fetches every other
        platform's manifest and config; `--skip-metadata` is passed unless `all_metadata`, so
        every version fetches what CRI does (the node's platform only).

        via_hosts: resolve through `hosts_dir` (what CRI does). With hosts.toml for the ref's
        host, its entries decide scheme and order; without one, ctr 1.6 falls back to the host
        itself over HTTPS unless `plain_http` (then HTTP). `plain_http` alone pulls straight
        from a plain-HTTP registry.
        """
        args = ["images", "pull"]
        if via_hosts:
            args += ["--hosts-dir", str(self.hosts_dir)]
        if plain_http:
            args.append("--plain-http")
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if self.runtime.at_least(2) and not all_metadata:
            args.append("--skip-metadata")
        if self.snapshotter != "overlayfs":
            args += ["--snapshotter", self.snapshotter]
        return self.ctr(*args, ref, check=check, timeout=timeout)

    def images(self, *, include_ids: bool = False) -> dict[str, str]:
        """Image name → target digest (the index digest for a multi-arch image).

        The CRI plugin adds a record named by the config digest alone (`sha256:…`) for every
        image in k8s.io, also for ctr pulls; those are left out unless `include_ids`.
        """
        out: dict[str, str] = {}
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and (include_ids or "/" in parts[0]):
                out[parts[0]] = parts[2]
        return out

    def content_digests(self) -> set[str]:
        """Digests of committed content in the k8s.io namespace."""
        return set(self.ctr("content", "ls", "-q").stdout.split())

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return self.content_root / "blobs" / algo / hexd

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str) -> bytes:
        """Bytes of a committed blob, read straight from the content store's files."""
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise KeyError(digest) from None

    def remove_image(self, name: str, *, sync: bool = True) -> None:
        """Delete the image record and CRI's id/digest aliases of the same target (they would
        keep the content alive); with `sync`, wait until GC removed unreferenced content."""
        all_images = self.images(include_ids=True)
        target = all_images.get(name)
        names = [name] + [
            n
            for n, d in all_images.items()
            if n != name and d == target and (n.startswith("sha256:") or "@sha256:" in n)
        ]
        self.ctr("images", "rm", *(["--sync"] if sync else []), *names)

    def remove_all(self) -> None:
        """Delete every image (and, through GC, their content)."""
        names = list(self.images(include_ids=True))
        if names:
            self.ctr("images", "rm", "--sync", *names)

    # --- hosts.toml ----------------------------------------------------------------------

    def write_hosts_toml(
        self,
        registry_host: str,
        mirror_url: list[str] | str | None = None,
        server_url: str | None = None,
        *,
        capabilities: tuple[str, ...] = ("pull", "resolve"),
    ) -> Path:
        """Write `<hosts_dir>/<registry_host>/hosts.toml` (`_default` catches every host).

        The default server is `http://<registry_host>` (test registries are plain HTTP);
        containerd re-reads the file on every pull.
        """
        if server_url is None and registry_host != "_default":
            server_url = f"http://{registry_host}"
        path = self.hosts_dir / registry_host / "hosts.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hosts_toml(mirror_url, server_url, capabilities))
        return path

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return f"<ContainerdNode {self.name} {self.runtime.version}{where} {self.socket}>"
