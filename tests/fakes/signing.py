"""One cluster key for unit tests: the signer a node's PeerSource uses and the admission its
app applies, so in-memory nodes prove membership to each other as the daemon's do."""

from __future__ import annotations

from shoal.tenancy.admission import Admission
from shoal.tenancy.keys import ClusterKey
from shoal.tenancy.signer import PeerSigner

KEY = ClusterKey(b"the cluster key of the unit tests' nodes, 32+ bytes")


def signer(name: str = "me") -> PeerSigner:
    return PeerSigner(KEY, lambda: name)


def admission(name: str = "me") -> Admission:
    """What node `name` admits: its own containerd (loopback) and peers signing with KEY."""
    return Admission(KEY, lambda: name)
