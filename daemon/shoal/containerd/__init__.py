"""shoal's containerd client: images, content, events and leases over containerd's gRPC API.

Generated stubs live in `shoal.containerd.api` (regenerate with scripts/genproto).
"""

from shoal.containerd.client import (
    DEFAULT_EVENT_FILTERS,
    DEFAULT_NAMESPACE,
    DEFAULT_SOCKET,
    ContainerdClient,
    decode_event,
    quote_filter,
)
from shoal.containerd.model import (
    ContainerdError,
    ContainerdNotFound,
    ContainerdUnavailable,
    ContentInfo,
    Descriptor,
    Event,
    Image,
    IngestStatus,
    Lease,
)
from shoal.containerd.walk import Blob, NodeImage, walk
from shoal.containerd.watch import Backoff, watch

__all__ = [
    "DEFAULT_EVENT_FILTERS",
    "DEFAULT_NAMESPACE",
    "DEFAULT_SOCKET",
    "Backoff",
    "Blob",
    "ContainerdClient",
    "ContainerdError",
    "ContainerdNotFound",
    "ContainerdUnavailable",
    "ContentInfo",
    "Descriptor",
    "Event",
    "Image",
    "IngestStatus",
    "Lease",
    "NodeImage",
    "decode_event",
    "quote_filter",
    "walk",
    "watch",
]
