"""Start real `shoal run` daemons next to harness containerd nodes."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

from tests.harness.containerd import ContainerdNode
from tests.harness.procs import Proc, free_port, start, tcp_open, wait_for

SHOAL = [sys.executable, "-m", "shoal.cli"]


def _shoal_command(name: str) -> list[str]:
    """`shoal` itself, or under cProfile when SHOAL_PROFILE_DIR names where its profile goes
    (written when it stops, in CPU seconds of the event loop: where a bench's CPU goes)."""
    directory = os.environ.get("SHOAL_PROFILE_DIR")
    if not directory:
        return SHOAL
    out = Path(directory) / f"shoal-{name}.prof"
    return [sys.executable, "-m", "tests.harness.profiled", str(out)]


class ShoalDaemon:
    """`shoal run` for one node: its containerd, its own ports, optionally inside its netns.
    `host` is its address; `bind` (default `host`) where the registry and metrics listen."""

    def __init__(
        self,
        node: ContainerdNode,
        *,
        host: str = "127.0.0.1",
        bind: str | None = None,
        port: int | None = None,
        metrics_port: int | None = None,
        p2p_port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.node = node
        self.host = host
        self.bind = bind or host
        self.port = port or free_port(host, node.netns)
        self.metrics_port = metrics_port or free_port(host, node.netns)
        self.p2p_port = p2p_port or free_port(host, node.netns)
        self.extra_args = list(extra_args or [])
        self.data_dir = node.base_dir / "shoal-data"
        self.log_path = node.base_dir / "shoal.log"
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    def argv(self) -> list[str]:
        return [
            *_shoal_command(self.node.name),
            "run",
            "--containerd-socket", str(self.node.socket),
            "--containerd-namespace", self.node.namespace,
            "--listen", f"{self.bind}:{self.port}",
            "--metrics-listen", f"{self.bind}:{self.metrics_port}",
            "--p2p-listen", f"{self.host}:{self.p2p_port}",
            "--p2p-announce", self.host,
            "--data-dir", str(self.data_dir),
            "--log-level", "info",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 30) -> ShoalDaemon:
        self.proc = start(
            self.argv(), name=f"shoal-{self.node.name}", log_path=self.log_path,
            netns=self.node.netns,
        )  # fmt: skip
        wait_for(
            lambda: tcp_open(self.host, self.port, self.node.netns)
            and tcp_open(self.host, self.metrics_port, self.node.netns),
            timeout=timeout, what=f"shoal on {self.node.name}", proc=self.proc,
        )  # fmt: skip
        return self

    def synced(self) -> bool:
        """Whether the first catalog sync decided what this node may share (until then it
        shares nothing, and its containerd gets no manifest from its store). A restart with
        keys left to withdraw waits for a peer first (up to 30 s)."""
        try:
            with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as resp:
                return b"shoal_images_by_status{" in resp.read()
        except OSError:
            return False

    def wait_synced(self, timeout: float = 60) -> ShoalDaemon:
        wait_for(self.synced, timeout=timeout, what=f"shoal on {self.node.name} to sync",
                 proc=self.proc)  # fmt: skip
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None

    def log_lines(self) -> list[dict]:
        out = []
        for line in Path(self.log_path).read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus metric's samples whose labels include `labels`."""
        text = urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total
