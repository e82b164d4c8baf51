"""The containerd client the daemon uses (containerd 1.6 and later): version and content root
(`connection`), Content reads (`content`), Images (`images`) and Events (`events`). Writing
content and leases is `shoal.containerd.ingest`."""

from __future__ import annotations

from shoal.containerd.events import EventCalls
from shoal.containerd.images import ImageReads


class ContainerdClient(ImageReads, EventCalls):
    """One gRPC channel to containerd, scoped to one namespace (see `Connection`)."""
