"""shoal's containerd client: images, content and events over containerd's gRPC API, grouped by
service; writing content and leases in `ingest`.

Generated stubs live in `shoal.containerd.api` (regenerate with scripts/genproto).
"""

from shoal.containerd.client import ContainerdClient
from shoal.containerd.connection import DEFAULT_NAMESPACE, DEFAULT_SOCKET, quote_filter
from shoal.containerd.events import DEFAULT_EVENT_FILTERS, decode_event
from shoal.containerd.model import (
    ContainerdError,
    ContainerdNotFound,
    ContainerdUnavailable,
    ContentInfo,
    Event,
    Image,
    IngestStatus,
    Lease,
)
from shoal.containerd.walk import ImageBlob, NodeImage, walk
from shoal.containerd.watch import Backoff, watch

__all__ = [
    "DEFAULT_EVENT_FILTERS",
    "DEFAULT_NAMESPACE",
    "DEFAULT_SOCKET",
    "Backoff",
    "ContainerdClient",
    "ContainerdError",
    "ContainerdNotFound",
    "ContainerdUnavailable",
    "ContentInfo",
    "Event",
    "Image",
    "ImageBlob",
    "IngestStatus",
    "Lease",
    "NodeImage",
    "decode_event",
    "quote_filter",
    "walk",
    "watch",
]
