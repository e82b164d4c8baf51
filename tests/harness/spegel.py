"""Spegel (`spegel registry`) next to a harness containerd node, for side-by-side benches.

Spegel is built from its Go module (`gotools.SPEGEL`; v0.7.3, since the module proxy here
refuses v0.7.4). Each node runs it as its DaemonSet would: registry, router and metrics ports
on the node's address, the node's containerd socket, namespace and content directory, and
static bootstrap. Static bootstrap needs every peer's ID up front, so each node's identity key
is written here (Spegel loads `<data-dir>/private.key`, a PKCS#8 Ed25519 key) and its peer ID
derived from it. containerd's hosts.toml comes from `spegel configuration`, as in Spegel's
chart.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.peer.id import ID

from .containerd import ContainerdNode
from .procs import HarnessError, Proc, start, tcp_open, wait_for
from .registry import http_request

__all__ = ["REGISTRY_PORT", "ROUTER_PORT", "SpegelDaemon", "configure_hosts"]

REGISTRY_PORT, ROUTER_PORT, METRICS_PORT = 5000, 5001, 9090


def configure_hosts(
    binary: Path, hosts_dir: Path, registry_url: str, mirror_url: str, netns: str | None = None
) -> None:
    """`spegel configuration`: `<hosts_dir>/<registry>/hosts.toml` with Spegel first (pull and
    resolve) and the registry as `server`."""
    cmd = [str(binary), "configuration", "--containerd-registry-config-path", str(hosts_dir),
           "--mirrored-registries", registry_url, "--mirror-targets", mirror_url]  # fmt: skip
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise HarnessError(f"spegel configuration failed: {proc.stderr.strip()[-1000:]}")


class SpegelDaemon:
    """`spegel registry` for one node, inside its netns, at `host`."""

    def __init__(
        self,
        binary: Path,
        node: ContainerdNode,
        host: str,
        *,
        mirrored_registries: list[str],
        extra_args: list[str] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.binary = binary
        self.node = node
        self.host = host
        self.mirrored_registries = mirrored_registries
        self.extra_args = list(extra_args or [])
        self.log_level = log_level
        self.data_dir = node.base_dir / "spegel-data"
        self.log_path = node.base_dir / "spegel.log"
        self.peers: list[str] = []
        self.proc: Proc | None = None
        self.peer_id = self._write_identity()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{REGISTRY_PORT}"

    @property
    def multiaddr(self) -> str:
        return f"/ip4/{self.host}/tcp/{ROUTER_PORT}/p2p/{self.peer_id}"

    def _write_identity(self) -> str:
        key = Ed25519PrivateKey.generate()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )  # fmt: skip
        path = self.data_dir / "private.key"
        path.write_bytes(pem)
        path.chmod(0o600)
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return ID.from_pubkey(Ed25519PublicKey.from_bytes(raw)).to_base58()

    def argv(self) -> list[str]:
        args = [
            str(self.binary), "--log-level", self.log_level, "registry",
            "--containerd-sock", str(self.node.socket),
            "--containerd-namespace", self.node.namespace,
            "--containerd-content-path", str(self.node.content_root),
            "--data-dir", str(self.data_dir),
            "--registry-addr", f"{self.host}:{REGISTRY_PORT}",
            "--router-addr", f"{self.host}:{ROUTER_PORT}",
            "--metrics-addr", f"{self.host}:{METRICS_PORT}",
            "--mirrored-registries", *self.mirrored_registries,
            "--bootstrap-kind", "static",
        ]  # fmt: skip
        args += self.extra_args
        if self.peers:  # a list flag: last, so that it takes no other argument
            args += ["--static-bootstrap-peers", *self.peers]
        return args

    def start(self, peers: list[str], timeout: float = 30) -> SpegelDaemon:
        self.peers = [p for p in peers if p != self.multiaddr]
        self.proc = start(
            self.argv(), name=f"spegel-{self.node.name}", log_path=self.log_path,
            netns=self.node.netns,
        )  # fmt: skip
        wait_for(
            lambda: tcp_open(self.host, REGISTRY_PORT, self.node.netns),
            timeout=timeout, what=f"spegel on {self.node.name}", proc=self.proc,
        )  # fmt: skip
        return self

    def ready(self) -> bool:
        """Spegel's own readiness: its routing table holds a peer and bootstrap completed."""
        return self.request("/readyz")[0] == 200

    def request(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """From the node's own namespace, as its containerd would ask."""
        from .netns import run_in_netns

        call = lambda: http_request(f"{self.url}{path}", method=method, timeout=10)  # noqa: E731
        return run_in_netns(self.node.netns, call) if self.node.netns else call()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
