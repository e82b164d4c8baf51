"""Every setting of `shoal run`, in one place: its flag, its SHOAL_* variable, default and help.

The CLI builds its parser from OPTIONS, the Helm chart's tests check the chart against it, and the
daemon reads a `Settings` made from the parsed arguments.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any

TAG_POLICIES = ("upstream-first", "peers", "digest-only")
BOOTSTRAP_MODES = ("none", "static", "dns", "kubernetes")
PEER_TRANSFERS = ("relay", "redirect")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Option:
    name: str  # attribute name in Settings; flag is --name-with-dashes, env SHOAL_NAME
    default: Any
    help: str
    type: Any = str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "SHOAL_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("containerd_socket", "/run/containerd/containerd.sock", "containerd's gRPC socket"),
    Option("containerd_namespace", "k8s.io", "containerd namespace whose images are served"),
    Option(
        "content_root",
        "",
        "containerd's content directory, read directly when readable "
        "(default: asked from containerd's Introspection service)",
    ),
    Option("listen", "0.0.0.0:30020", "address of the registry API (host:port)"),
    Option("metrics_listen", "0.0.0.0:30021", "address of /metrics, /healthz and /readyz"),
    Option(
        "data_dir",
        "/var/lib/shoal",
        "directory for the peer identity, the spool and the record of verified files",
    ),
    Option(
        "http_header_timeout",
        10.0,
        "seconds a client has to send a request's headers once it began",
        type=float,
    ),
    Option(
        "http_idle_timeout", 60.0, "seconds an idle keep-alive connection stays open", type=float
    ),
    Option(
        "http_write_timeout",
        30.0,
        "seconds a client may leave an answer unread (nothing acknowledged) before it is cut",
        type=float,
    ),
    Option(
        "http_max_connections_per_client",
        64,
        "open connections per remote address (this node's own clients are not limited)",
        type=int,
    ),
    Option("http_max_connections", 1024, "open connections from remote addresses in all", type=int),
    Option("log_level", "info", "log level", choices=LOG_LEVELS),
    Option("p2p_listen", "0.0.0.0:30022", "libp2p listen address (host:port)"),
    Option("p2p_announce", "", "address peers reach this node at (default: first non-loopback)"),
    Option(
        "p2p_psk",
        "",
        "file holding a libp2p private-network key shared by the cluster "
        "(default: derived from the cluster key)",
    ),
    Option(
        "cluster_key_file",
        "",
        "file holding the secret every node of the cluster shares: peers sign their requests "
        "with keys derived from it (without it, only this node's containerd is served)",
    ),
    Option(
        "local_addresses",
        [],
        "addresses or CIDR networks whose requests count as this node's containerd, besides "
        "loopback (hostPort setups), comma separated",
        type=_csv,
    ),
    Option(
        "share_registries",
        [],
        "registry name patterns whose content is shared even when not served anonymously, "
        "comma separated (single-tenant and air-gapped clusters)",
        type=_csv,
    ),
    Option(
        "share_repositories",
        [],
        "<registry>/<repository> patterns shared even when not served anonymously, comma separated",
        type=_csv,
    ),
    Option(
        "share_unknown",
        False,
        "share content whose status could not be learned (registry unreachable or not in "
        "--mirror-registries)",
        type=_bool,
    ),
    Option(
        "status_refresh",
        3600.0,
        "seconds after which shoal asks again whether a registry serves an image anonymously",
        type=float,
    ),
    Option("bootstrap", "none", "how to find the first peers", choices=BOOTSTRAP_MODES),
    Option("bootstrap_peers", [], "static bootstrap multiaddrs, comma separated", type=_csv),
    Option("bootstrap_dns", "", "headless Service name resolving to the other nodes"),
    Option("bootstrap_k8s_namespace", "", "namespace of the shoal pods (kubernetes bootstrap)"),
    Option("bootstrap_k8s_selector", "app.kubernetes.io/name=shoal", "label selector of the pods"),
    Option("ready_alone", False, "report ready without any peer", type=_bool),
    Option(
        "mirror_registries",
        ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io", "public.ecr.aws"],
        "registries shoal may fetch from upstream (allow-list), comma separated",
        type=_csv,
    ),
    Option("tag_policy", "upstream-first", "how tags are resolved", choices=TAG_POLICIES),
    Option("tag_ttl", 5.0, "seconds an upstream tag answer is reused", type=float),
    Option("upstream_credentials", "", "docker config.json style credentials file for upstreams"),
    Option("upstream_insecure", [], "registries reached over plain HTTP (comma list)", type=_csv),
    Option("upstream_connect_timeout", 3.0, "seconds to connect to an upstream", type=float),
    Option(
        "upstream_first_byte_timeout",
        3.0,
        "seconds an upstream has to answer a request once connected (status and headers)",
        type=float,
    ),
    Option("upstream_read_timeout", 30.0, "seconds an upstream body may stay silent", type=float),
    Option(
        "upstream_breaker_failures",
        3,
        "consecutive failures (no connection, no answer in time, 502/503/504) after which "
        "an upstream is not asked for a while: misses are answered at once",
        type=int,
    ),
    Option(
        "upstream_breaker_cooldown",
        10.0,
        "seconds before an upstream that stopped answering is probed again (doubles per "
        "failed probe, up to 60)",
        type=float,
    ),
    Option("resync_interval", 60.0, "seconds between full re-reads of the store", type=float),
    Option("spool_max_bytes", 10 * 1024**3, "bytes the in-flight spool may hold", type=int),
    Option(
        "peer_transfer",
        "relay",
        "blob bodies a peer holds: relay them through this node's spool (holders under progress "
        "deadlines), or redirect containerd to the peer (cheaper, but a holder that stalls "
        "stalls the pull)",
        choices=PEER_TRANSFERS,
    ),
    Option(
        "ordered_streams",
        1,
        "upstream downloads an image's designated fetcher runs at once, in manifest order "
        "(0: each blob is fetched when containerd asks for it)",
        type=int,
    ),
    Option(
        "herd_fanout",
        2,
        "peers one node sends one blob to at once; the rest are referred to those receiving it, "
        "which pass it on as it arrives: a tree instead of a star (0: no bound)",
        type=int,
    ),
    Option(
        "scrub_interval",
        86400.0,
        "seconds within which every file of the content store shoal verified is hashed again",
        type=float,
    ),
    Option("scrub_min_rate", 4 * 1024**2, "bytes/s the scrub reads at least", type=int),
    Option("scrub_max_rate", 64 * 1024**2, "bytes/s the scrub reads at most", type=int),
)


@dataclass(frozen=True)
class Settings:
    """The daemon's settings; defaults live in OPTIONS only."""

    containerd_socket: str
    containerd_namespace: str
    content_root: str
    listen: str
    metrics_listen: str
    data_dir: str
    http_header_timeout: float
    http_idle_timeout: float
    http_write_timeout: float
    http_max_connections_per_client: int
    http_max_connections: int
    log_level: str
    p2p_listen: str
    p2p_announce: str
    p2p_psk: str
    cluster_key_file: str
    local_addresses: list[str]
    share_registries: list[str]
    share_repositories: list[str]
    share_unknown: bool
    status_refresh: float
    bootstrap: str
    bootstrap_peers: list[str]
    bootstrap_dns: str
    bootstrap_k8s_namespace: str
    bootstrap_k8s_selector: str
    ready_alone: bool
    mirror_registries: list[str]
    tag_policy: str
    tag_ttl: float
    upstream_credentials: str
    upstream_insecure: list[str]
    upstream_connect_timeout: float
    upstream_first_byte_timeout: float
    upstream_read_timeout: float
    upstream_breaker_failures: int
    upstream_breaker_cooldown: float
    resync_interval: float
    spool_max_bytes: int
    peer_transfer: str
    ordered_streams: int
    herd_fanout: int
    scrub_interval: float
    scrub_min_rate: int
    scrub_max_rate: int

    @classmethod
    def defaults(cls, **overrides: Any) -> Settings:
        values = {opt.name: opt.default for opt in OPTIONS}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> Settings:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def add_run_options(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> None:
    """Adds every option; a SHOAL_* variable overrides the default, a flag overrides both."""
    env = os.environ if environ is None else environ
    for opt in OPTIONS:
        default = opt.default
        if opt.env in env:
            raw = env[opt.env]
            try:
                default = opt.type(raw) if opt.type is not str else raw
            except (ValueError, argparse.ArgumentTypeError):
                parser.error(f"{opt.env}={raw!r} is not a valid value")
            if opt.choices and default not in opt.choices:
                parser.error(f"{opt.env}={raw!r}: choose from {', '.join(opt.choices)}")
        kwargs: dict[str, Any] = {"default": default, "help": f"{opt.help} [env {opt.env}]"}
        if opt.type is not str:
            kwargs["type"] = opt.type
        if opt.choices:
            kwargs["choices"] = opt.choices
        parser.add_argument(opt.flag, dest=opt.name, **kwargs)
