"""Finding the first peers: static multiaddrs, a DNS name, the Kubernetes API, or none.

A libp2p dial needs the peer's ID, which DNS and the Kubernetes API do not know. Every shoal
node therefore serves its `NodeInfo` as JSON at `GET http://<ip>:<registry port>/_shoal/p2p`
(`shoal.registry.protocol.P2P_INFO_PATH`, on the registry API, which peers must reach anyway to
fetch blobs): discovery turns IPs into multiaddrs with `/p2p/<id>` through that endpoint. A
static address without `/p2p/` goes through the same step. Noise then checks the ID on dial.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from shoal.registry.protocol import P2P_INFO_PATH
from shoal.routing.options import http_hostport

log = logging.getLogger(__name__)

SERVICEACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# (ip, registry port) -> multiaddrs with /p2p/<id>; replaceable in tests.
InfoFetcher = Callable[[str, int], Awaitable[list[str]]]


class Discovery(Protocol):
    async def discover(self) -> list[str]:
        """Multiaddrs ending in /p2p/<id> (may include this node; the dialler skips it)."""
        ...


async def fetch_node_info(ip: str, port: int, timeout: float = 3.0) -> list[str]:
    """GET a peer's P2P_INFO_PATH and return its multiaddrs (each with /p2p/<id>)."""
    import aiohttp

    url = f"http://{http_hostport(ip, port)}{P2P_INFO_PATH}"
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        async with session.get(url) as resp:
            resp.raise_for_status()
            data = await resp.json(content_type=None)
    return info_to_addrs(data)


def info_to_addrs(data: Any) -> list[str]:
    """Validate a NodeInfo JSON document; every address gets the peer's /p2p/<id>."""
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise ValueError("node info without an id")
    peer_id = data["id"]
    addrs = data.get("addrs") or []
    if not isinstance(addrs, list):
        raise ValueError("node info addrs is not a list")
    out = []
    for addr in addrs:
        if not isinstance(addr, str) or not addr.startswith("/"):
            continue
        out.append(addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id}")
    return out


async def _infos_for_ips(ips: Sequence[str], port: int, fetch: InfoFetcher) -> list[str]:
    async def one(ip: str) -> list[str]:
        try:
            return await fetch(ip, port)
        except Exception as exc:  # a node still starting, or not a shoal node
            log.debug("no node info from %s: %r", ip, exc)
            return []

    results = await asyncio.gather(*(one(ip) for ip in dict.fromkeys(ips)))
    return [addr for addrs in results for addr in addrs]


def ip_of_multiaddr(addr: str) -> str | None:
    """The host of a multiaddr (`/ip4/<ip>/tcp/…`, ip6, dns): None if it names none."""
    parts = addr.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("ip4", "ip6", "dns", "dns4", "dns6"):
            return parts[i + 1]
    return None


class StaticDiscovery:
    """`bootstrap_peers`: multiaddrs with /p2p/<id> are used as they are; others are asked."""

    def __init__(
        self, addrs: Sequence[str], registry_port: int, fetch: InfoFetcher = fetch_node_info
    ) -> None:
        self._addrs = list(addrs)
        self._port = registry_port
        self._fetch = fetch

    async def discover(self) -> list[str]:
        ready = [a for a in self._addrs if "/p2p/" in a]
        ask = [ip for a in self._addrs if "/p2p/" not in a and (ip := ip_of_multiaddr(a))]
        return ready + await _infos_for_ips(ask, self._port, self._fetch)


class DnsDiscovery:
    """`bootstrap_dns`: a (headless Service) name whose A/AAAA records are the other nodes."""

    def __init__(self, name: str, registry_port: int, fetch: InfoFetcher = fetch_node_info) -> None:
        self._name = name
        self._port = registry_port
        self._fetch = fetch

    async def resolve(self) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self._name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            log.info("bootstrap name %s does not resolve: %s", self._name, exc)
            return []
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def discover(self) -> list[str]:
        return await _infos_for_ips(await self.resolve(), self._port, self._fetch)


def _list_pod_ips(namespace: str, selector: str) -> list[str]:
    """Pod IPs of running pods matching `selector` (in-cluster config; needs `list pods`)."""
    from kubernetes import client, config

    config.load_incluster_config()
    pods = client.CoreV1Api().list_namespaced_pod(
        namespace, label_selector=selector, _request_timeout=10
    )
    return pod_ips(pods.items)


def pod_ips(pods: Sequence[Any]) -> list[str]:
    ips = []
    for pod in pods:
        status = getattr(pod, "status", None)
        ip = getattr(status, "pod_ip", None)
        if ip and getattr(status, "phase", None) == "Running":
            ips.append(ip)
    return ips


def current_namespace(default: str = "default") -> str:
    try:
        with open(SERVICEACCOUNT_NAMESPACE, encoding="utf-8") as fh:
            return fh.read().strip() or default
    except OSError:
        return default


class KubernetesDiscovery:
    """`bootstrap: kubernetes`: the pods of the shoal DaemonSet, found through the API server."""

    def __init__(
        self,
        namespace: str,
        selector: str,
        registry_port: int,
        fetch: InfoFetcher = fetch_node_info,
        list_ips: Callable[[str, str], list[str]] = _list_pod_ips,
    ) -> None:
        self._namespace = namespace or current_namespace()
        self._selector = selector
        self._port = registry_port
        self._fetch = fetch
        self._list_ips = list_ips

    async def discover(self) -> list[str]:
        try:
            ips = await asyncio.to_thread(self._list_ips, self._namespace, self._selector)
        except Exception as exc:
            log.warning("listing shoal pods in %s failed: %s", self._namespace, exc)
            return []
        return await _infos_for_ips(ips, self._port, self._fetch)


def make_discovery(settings: Any, registry_port: int) -> Discovery | None:
    """From `Settings.bootstrap` and its companions; None for `none`."""
    mode = settings.bootstrap
    if mode == "none":
        return None
    if mode == "static":
        return StaticDiscovery(settings.bootstrap_peers, registry_port)
    if mode == "dns":
        if not settings.bootstrap_dns:
            raise ValueError("bootstrap=dns needs bootstrap_dns")
        return DnsDiscovery(settings.bootstrap_dns, registry_port)
    if mode == "kubernetes":
        return KubernetesDiscovery(
            settings.bootstrap_k8s_namespace, settings.bootstrap_k8s_selector, registry_port
        )
    raise ValueError(f"unknown bootstrap mode {mode!r}")
