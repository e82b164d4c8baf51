"""The protocol between shoal nodes: the marks on their requests, and the URLs they use.

A request a peer's shoal sends carries PEER_HEADER and a signature (`shoal.tenancy.tokens`);
the node answers it from what it holds itself and never forwards it, so requests never loop.
With FETCH_HEADER as well, the sender chose this node to fetch the content from upstream for
the cluster. A URL a node redirects its containerd to carries a capability instead, and
FETCH_QUERY for a designated fetch (containerd sends no extra headers). Who asked is decided by
`shoal.tenancy.admission`, never by the marks alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from yarl import URL

from shoal.content.model import ContentKind
from shoal.oci.digest import Digest

PEER_HEADER = "X-Shoal-Peer"
FETCH_HEADER = "X-Shoal-Fetch"
FETCH_QUERY = "shoal-fetch"
# Served by the registry app (GET, JSON `NodeInfo.to_json()`): how dns/kubernetes bootstrap
# learns a peer's libp2p ID, which a dial needs, from nothing but its IP.
P2P_INFO_PATH = "/_shoal/p2p"


class Asker(Enum):
    """Who sent a request, which decides the Sources that may answer it."""

    CONTAINERD = "containerd"  # this node's containerd
    PEER = "peer"  # another node: answered from what this node holds and may share
    FETCH = "fetch"  # another node that chose this one to fetch from upstream for the cluster


def peer_headers(fetch: bool) -> dict[str, str]:
    """The marks on a request to a peer's shoal (signed by `shoal.tenancy.signer`)."""
    return {PEER_HEADER: "1", **({FETCH_HEADER: "1"} if fetch else {})}


def content_path(repository: str, kind: ContentKind, digest: Digest | str) -> str:
    return f"/v2/{repository}/{'manifests' if kind == 'manifest' else 'blobs'}/{digest}"


def peer_url(
    address: str, path: str, ns: str | None, marks: Mapping[str, str] | None = None
) -> str:
    """`path` at the shoal listening on `address` (host:port), for the registry `ns`."""
    query = {"ns": ns} if ns else {}
    return str(URL(f"http://{address}{path}").with_query({**query, **(marks or {})}))
